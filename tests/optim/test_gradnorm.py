"""GradNormLoRP layer and method: init invariance, weight-norm gradients vs the spec's closed form, exact merge,
targeting, param-group tagging, artifacts, bad input. (Training with the optimizers: test_gradnorm_train.py.)"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from leantrain.config import TrainConfig
from leantrain.optim.gradnorm import (
    GRADNORMLORP,
    WeightNormLinear,
    merge,
    merged_state_dict,
    reparametrize,
    resolve_linear_targets,
)


class MLP(nn.Module):
    """PEFT's test model, with a head named ``classifier`` (what every leantrain method leaves alone)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20, bias=False)
        self.classifier = nn.Linear(20, 2)

    def forward(self, x):
        return self.classifier(self.relu(self.lin1(self.relu(self.lin0(x)))))


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def test_layer_equals_linear_at_init():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    wn = WeightNormLinear.from_linear(lin)
    x = torch.randn(4, 7)
    torch.testing.assert_close(wn(x), lin(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(wn.weight_g, lin.weight.norm(dim=1))
    assert wn.bias is lin.bias


def test_gradients_match_the_weight_norm_formula():
    torch.manual_seed(1)
    wn = WeightNormLinear(7, 5)
    nn.init.normal_(wn.weight_v)
    nn.init.uniform_(wn.weight_g, 0.5, 2.0)
    nn.init.zeros_(wn.bias)
    x = torch.randn(3, 7)
    G = torch.randn(3, 5)  # upstream dL/dy, so dL/dW = G^T x
    (wn(x) * G).sum().backward()
    dW = G.T @ x
    v, g = wn.weight_v.detach(), wn.weight_g.detach()
    vn = v.norm(dim=1, keepdim=True)
    vhat = v / vn
    dg = (dW * vhat).sum(1)  # <G_i, v^_i>
    dV = (g[:, None] / vn) * (dW - dg[:, None] * vhat)
    torch.testing.assert_close(wn.weight_g.grad, dg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wn.weight_v.grad, dV, atol=1e-5, rtol=1e-5)
    assert (wn.weight_v.grad * v).sum(1).abs().max() < 1e-5  # V-gradient is orthogonal to V row-wise


def test_merge_is_exact_after_training_like_changes():
    model = _mlp()
    reparametrize(model, "all-linear")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WeightNormLinear):
                m.weight_v.add_(0.3 * torch.randn_like(m.weight_v))
                m.weight_g.mul_(1.5)
    x = torch.randn(6, 10)
    before = model(x)
    state = merged_state_dict(model)
    names = merge(model)
    assert names == ["lin0", "lin1"]
    assert not any(isinstance(m, WeightNormLinear) for m in model.modules())
    assert type(model.lin0) is nn.Linear
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
    fresh = _mlp(seed=5)
    fresh.load_state_dict(state, strict=True)  # original key names, plain Linear
    torch.testing.assert_close(fresh(x), before, atol=1e-6, rtol=0)


def test_reparametrized_tiny_bert_equals_original():
    from leantrain.models import build_classifier

    model = build_classifier("tiny", 3).eval()
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    ref = model(ids, mask)
    cfg = TrainConfig(model="tiny", method="gradnormlorp", rank=4, gap=10, svd="full", targets="all-linear")
    groups = GRADNORMLORP.apply(model, cfg)
    torch.testing.assert_close(model(ids, mask), ref, atol=1e-5, rtol=0)
    assert type(model.classifier) is nn.Linear  # the head stays a plain Linear
    wn = [n for n, m in model.named_modules() if isinstance(m, WeightNormLinear)]
    assert len(wn) == 12  # q, k, v, attn-out, ffn-in, ffn-out x 2 layers
    tagged = [g for g in groups if g.get("rank") is not None]
    assert len(tagged) == 1 and tagged[0]["rank"] == 4 and tagged[0]["update_proj_gap"] == 10
    assert tagged[0]["scale"] == 0.25 and tagged[0]["proj_type"] == "std" and tagged[0]["svd"] == "full"
    vs = {id(model.get_submodule(n).weight_v) for n in wn}
    assert {id(p) for p in tagged[0]["params"]} == vs
    head = {id(p) for p in model.classifier.parameters()}
    other = [p for g in groups if g.get("rank") is None for p in g["params"]]
    gs = {id(model.get_submodule(n).weight_g) for n in wn}
    assert gs <= {id(p) for p in other} and not vs & {id(p) for p in other}
    assert not head & {id(p) for g in groups for p in g["params"]}  # the training loop adds the head itself
    everything = {id(p) for p in model.parameters()} - head
    assert {id(p) for g in groups for p in g["params"]} == everything
    assert all(p.requires_grad for p in model.parameters())


def test_small_matrices_are_not_projected():
    model = _mlp()
    groups = GRADNORMLORP.apply(model, TrainConfig(rank=12, targets="all-linear"))
    tagged = [p for g in groups if g.get("rank") for p in g["params"]]
    assert [tuple(p.shape) for p in tagged] == [(20, 20)]  # lin0's V is 20x10: rank 12 >= 10 -> plain Adam


@pytest.mark.parametrize("targets,expected", [
    ("all-linear", ["lin0", "lin1"]), ("lin1", ["lin1"]), ("lin0, lin1", ["lin0", "lin1"]), ("re:lin[0]", ["lin0"]),
])
def test_targets(targets, expected):
    assert resolve_linear_targets(_mlp(), targets) == expected


@pytest.mark.parametrize("targets,match", [
    ("lin7", "'lin7'"), ("classifier", "'classifier'"), ("re:nothing.*", "nothing"), ("re:(", "invalid"),
])
def test_bad_targets_name_the_value(targets, match):
    with pytest.raises(ValueError, match=match):
        resolve_linear_targets(_mlp(), targets)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="Conv1d"):
        WeightNormLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_save_artifacts_writes_loadable_merged_weights(tmp_path):
    from safetensors.torch import load_file

    model = _mlp()
    GRADNORMLORP.apply(model, TrainConfig(rank=4))
    with torch.no_grad():
        model.lin1.weight_g.mul_(0.5)
    x = torch.randn(3, 10)
    out = model(x)
    GRADNORMLORP.save_artifacts(model, tmp_path, TrainConfig(rank=4))
    assert sorted(os.listdir(tmp_path)) == ["merged_model.json", "merged_model.safetensors"]
    fresh = _mlp(seed=3)
    fresh.load_state_dict(load_file(tmp_path / "merged_model.safetensors"), strict=True)
    torch.testing.assert_close(fresh(x), out, atol=1e-6, rtol=0)
