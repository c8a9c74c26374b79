"""Differential tests against peft's MiSS (default, remainder, bat, mini): outputs and files both directions."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters.miss import MissConfig

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.peer


class MLP(nn.Module):  # PEFT's test model
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


def _model(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP()


CASES = [  # (our kwargs, PEFT kwargs)
    ({"r": 2}, {"r": 2, "init_weights": True}),
    ({"r": 3}, {"r": 3, "init_weights": True}),  # in=10 not divisible by 3: padding / remainder rule
    ({"r": 2, "variant": "bat"}, {"r": 2, "init_weights": "bat"}),
    ({"r": 2, "variant": "mini", "mini_r": 5}, {"r": 2, "init_weights": "mini", "mini_r": 5}),
]


def _randomise(module_block: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module_block.copy_(0.1 * torch.randn(module_block.shape, generator=g))


@pytest.mark.parametrize("ours_kw,peft_kw", CASES)
def test_peft_file_loads_in_leantrain(tmp_path, ours_kw, peft_kw):
    pm = peft.get_peft_model(_model(1), peft.MissConfig(target_modules=["lin0"], **peft_kw))
    _randomise(pm.base_model.model.lin0.miss_block["default"], 3)
    x = torch.randn(5, 10)
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(tmp_path)
    ours = _model(1)
    adapters.load(ours, tmp_path)
    assert adapters.adapter_config(ours, "default") == MissConfig(target_modules=["lin0"], **ours_kw)
    torch.testing.assert_close(ours(x), want, atol=1e-6, rtol=1e-5)
    pm.merge_adapter()
    adapters.merge(ours)
    torch.testing.assert_close(ours.lin0.base_layer.weight, pm.base_model.model.lin0.base_layer.weight,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ours_kw,peft_kw", CASES)
def test_leantrain_file_loads_in_peft(tmp_path, ours_kw, peft_kw):
    ours = _model(2)
    adapters.inject(ours, MissConfig(target_modules=["lin0"], **ours_kw))
    _randomise(ours.lin0.adapters["default"].miss_block, 4)
    x = torch.randn(5, 10)
    want = ours(x).detach()
    adapters.save(ours, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["init_weights"] == peft_kw["init_weights"]
    pm = peft.PeftModel.from_pretrained(_model(2), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-6, rtol=1e-5)
