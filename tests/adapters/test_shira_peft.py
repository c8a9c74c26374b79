"""SHiRA against peft beyond the shared table of test_peft_compat.py: indices, masks, delta weights, gradients."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters.shira import ShiraConfig

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


def test_peft_indices_are_kept(tmp_path):
    """Outputs both ways are in test_peft_compat.py's table; here: PEFT's (2, K) indices are ours, in
    torch.where order."""
    pm = peft.get_peft_model(_model(1), peft.ShiraConfig(r=2, target_modules=["lin0"], init_weights=False,
                                                          random_seed=7))
    pm.save_pretrained(tmp_path)
    ours = _model(1)
    adapters.load(ours, tmp_path)
    peft_idx = pm.base_model.model.lin0.shira_indices["default"]
    assert torch.equal(ours.lin0.peft_state("default")["shira_indices"], peft_idx.to(torch.int32))


@pytest.mark.parametrize("mask", ["random", "magnitude"])
def test_leantrain_file_loads_in_peft(tmp_path, mask):
    ours = _model(2)
    adapters.inject(ours, ShiraConfig(r=2, target_modules=["lin0"], mask=mask, init_weights=False))
    x = torch.randn(5, 10)
    want = ours(x).detach()
    adapters.save(ours, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["peft_type"] == "SHIRA"
    pm = peft.PeftModel.from_pretrained(_model(2), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), want, atol=1e-6, rtol=1e-5)
    delta_peft = pm.base_model.model.lin0.get_delta_weight("default").to_dense()
    torch.testing.assert_close(delta_peft, ours.lin0.delta_weight("default"), atol=0, rtol=0)


def test_same_weights_same_gradients():
    """One backward pass: PEFT's dense-materialising SHiRA and our sparse path give the same value gradients."""
    base = _model(3)
    pm = peft.get_peft_model(base, peft.ShiraConfig(r=2, target_modules=["lin0"], init_weights=False))
    ours = _model(3)
    adapters.inject(ours, ShiraConfig(r=2, target_modules=["lin0"]))
    st = {"shira_weight": pm.base_model.model.lin0.shira_weight["default"].detach(),
          "shira_indices": pm.base_model.model.lin0.shira_indices["default"]}
    ours.lin0.load_peft_state("default", st, where="lin0")
    x = torch.randn(8, 10)
    pm(x).pow(2).sum().backward()
    ours(x).pow(2).sum().backward()
    torch.testing.assert_close(ours.lin0.adapters["default"].shira_weight.grad,
                               pm.base_model.model.lin0.shira_weight["default"].grad, atol=1e-5, rtol=1e-5)
