"""Converter (dense → low-rank by truncated SVD), safetensors round trips across rank changes, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain.lowrank import (
    KLSOptimizer,
    LowRankConv2d,
    LowRankLinear,
    convert_to_lowrank,
    load_lowrank,
    load_lowrank_state,
    lowrank_layers,
    lowrank_state,
    make_lowrank,
    model_params,
    save_lowrank,
)


class MLP(nn.Module):
    """PEFT's test MLP shape, plus a head that must never be converted by "all-linear"."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 16)
        self.classifier = nn.Linear(16, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def test_svd_init_is_eckart_young_truncation():
    """From a dense W the factors are the truncated SVD: ||W − W_r||_F = ||σ[r:]||₂ and full rank is exact."""
    torch.manual_seed(0)
    dense = nn.Linear(12, 9, dtype=torch.float64)
    sigma = torch.linalg.svdvals(dense.weight.detach())
    for r in (3, 9):
        low = make_lowrank(dense, "fc", r)
        err = (low.weight_matrix() - dense.weight.detach()).norm()
        assert float(err) == pytest.approx(float(sigma[r:].norm()), abs=1e-12)
        assert torch.equal(low.bias.detach(), dense.bias.detach())
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.allclose(make_lowrank(dense, "fc", 9)(x), dense(x), atol=1e-12)


def test_tau_picks_initial_rank_and_all_linear_skips_head():
    torch.manual_seed(0)
    model = MLP()
    model.lin1 = nn.Linear(20, 16)
    with torch.no_grad():  # a decaying spectrum so the τ rule lands strictly inside the rank bounds
        u, _, vh = torch.linalg.svd(model.lin1.weight, full_matrices=False)
        model.lin1.weight.copy_(u @ torch.diag(0.5 ** torch.arange(16.0)) @ vh)
    sigmas = {n: torch.linalg.svdvals(getattr(model, n).weight.detach()) for n in ("lin0", "lin1")}
    names = convert_to_lowrank(model, "all-linear", tau=0.3)
    assert names == ["lin0", "lin1"] and isinstance(model.classifier, nn.Linear)
    for name, layer in lowrank_layers(model):
        s = sigmas[name]
        # smallest r with ||σ[r:]|| < 0.3 ||σ||, clamped to [2, min(n, m) // 2]
        r = next(r for r in range(len(s) + 1) if float(s[r:].norm()) < 0.3 * float(s.norm()))
        assert layer.max_rank == min(layer.n, layer.m) // 2
        assert layer.rank == max(2, min(r, layer.max_rank)), (name, r)
    assert model.lin1.rank == 2  # 0.5^k spectrum: ||σ[2:]|| / ||σ|| = 0.25 < 0.3 < ||σ[1:]|| / ||σ|| = 0.5
    info = model_params(model)
    assert info["ranks"] == {n: m.rank for n, m in lowrank_layers(model)}
    assert model.lin1.eval_params() == 2 * (20 + 16) + 2 * 2 + 16  # r(n+m) + r² + bias
    assert info["dense_params"] == sum(p.numel() for p in MLP().parameters())


def test_conv_conversion_matches_dense_at_full_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    low = make_lowrank(conv, "conv", 5)
    assert isinstance(low, LowRankConv2d)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert torch.allclose(low(x), conv(x), atol=1e-10)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(5 * 36, 4))
    assert convert_to_lowrank(model, "all") == ["0", "2"]
    assert isinstance(model[0], LowRankConv2d) and isinstance(model[2], LowRankLinear)


def _trained_model(tmp_steps=3):
    torch.manual_seed(0)
    model = MLP()
    convert_to_lowrank(model, ["lin0", "lin1"], rank={"lin0": 5, "lin1": 8})
    opt = KLSOptimizer(model, inner="sgd", lr=0.2, tau=0.3)
    x, y = torch.randn(32, 10), torch.randint(0, 2, (32,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(tmp_steps):
        opt.step(closure)
    return model, opt, x


def test_safetensors_roundtrip_across_rank_change(tmp_path):
    model, opt, x = _trained_model()
    ranks = opt.ranks()
    assert ranks != {"lin0": 5, "lin1": 8}, "ranks did not change; the resize path is untested"
    path = save_lowrank(model, tmp_path / "dlrt.safetensors")
    fresh = MLP()
    convert_to_lowrank(fresh, ["lin0", "lin1"], rank={"lin0": 5, "lin1": 8})
    assert load_lowrank(fresh, path) == ranks
    assert torch.equal(fresh(x), model(x))
    for (_, a), (_, b) in zip(lowrank_layers(model), lowrank_layers(fresh)):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)
    # the optimizer state follows once the factors are resized
    opt2 = KLSOptimizer(fresh, inner="sgd", lr=0.2, tau=0.3)
    opt2.load_state_dict(opt.state_dict())


def test_trainable_state_excludes_transient_factors_and_rejects_bad_keys():
    model, _, _ = _trained_model(1)
    state = lowrank_state(model)
    assert not any(k.endswith((".K", ".L")) for k in state)
    assert {"lin0.U", "lin0.S", "lin0.V", "lin0.bias", "classifier.weight"} <= set(state)
    fresh = MLP()
    convert_to_lowrank(fresh, ["lin0", "lin1"], rank=4)
    with pytest.raises(KeyError, match="nonsense"):
        load_lowrank_state(fresh, {**state, "nonsense": torch.zeros(1)})
    bad = dict(state)
    bad["lin0.S"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="lin0"):
        load_lowrank_state(fresh, bad)
    partial = {k: v for k, v in state.items() if k != "lin1.V"}
    with pytest.raises(KeyError, match="lin1"):
        load_lowrank_state(fresh, partial)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="rank=7"):
        LowRankLinear(6, 5, 7)  # rank larger than min(out, in) = 5
    with pytest.raises(ValueError, match="rank=0"):
        LowRankLinear(6, 5, 0)
    with pytest.raises(ValueError, match="rank=21"):
        make_lowrank(nn.Linear(20, 30), "lin", 21)
    with pytest.raises(ValueError, match="tau=0"):
        make_lowrank(nn.Linear(20, 30), "lin", tau=0)
    with pytest.raises(ValueError, match="tau=-0.5"):
        convert_to_lowrank(MLP(), "all-linear", tau=-0.5)
    with pytest.raises(ValueError, match="'nope'"):
        convert_to_lowrank(MLP(), ["nope"])
    with pytest.raises(TypeError, match="Embedding"):
        make_lowrank(nn.Embedding(4, 4), "emb", 2)
    with pytest.raises(ValueError, match="groups=2"):
        make_lowrank(nn.Conv2d(4, 4, 3, groups=2), "conv", 2)
