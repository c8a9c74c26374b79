"""MiSS config fields against peft (default, remainder, bat, mini); outputs are in test_peft_compat.py's table."""
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


@pytest.mark.parametrize("ours_kw,peft_kw", CASES)
def test_config_fields_map_both_ways(tmp_path, ours_kw, peft_kw):
    """Outputs and merges are compared for every adapter in test_peft_compat.py's table; here the MiSS config
    fields (variant <-> init_weights, mini_r, remainder rule at r=3 on in=10) map exactly in both directions."""
    pm = peft.get_peft_model(_model(1), peft.MissConfig(target_modules=["lin0"], **peft_kw))
    pm.save_pretrained(tmp_path / "peft")
    ours = _model(1)
    adapters.load(ours, tmp_path / "peft")
    assert adapters.adapter_config(ours, "default") == MissConfig(target_modules=["lin0"], **ours_kw)
    mine = _model(2)
    adapters.inject(mine, MissConfig(target_modules=["lin0"], **ours_kw))
    adapters.save(mine, tmp_path / "ours")
    body = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert body["init_weights"] == peft_kw["init_weights"]
    assert peft.PeftModel.from_pretrained(_model(2), tmp_path / "ours").peft_config["default"].r == ours_kw["r"]
