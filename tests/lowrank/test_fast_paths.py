"""DLRT step speed-ups (issue #21 item 4) against the paths they replace, which stay in the code as fallbacks:
the one-QR first round of ``augment`` vs re-orthonormalise + project + QR, the one-node K/L pass of a Linear vs the
two-branch graph, ``truncation_rank`` vs its definition, and a digits training run vs the old paths."""
from __future__ import annotations

import math

import pytest
import torch

from leantrain.lowrank import kls, layers
from leantrain.lowrank.digits import load_digits_split, train_run
from leantrain.lowrank.layers import LowRankLinear


def _old_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's code paths before the speed-ups: orth(U0) then the general loop; the two-branch K/L graph."""
    monkeypatch.setattr(kls, "_first_round", lambda u, k, tol: (kls.orth(u), k))
    monkeypatch.setattr(layers.LowRankMixin, "_fused_kl_ok", lambda self: False)


def _case(kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u0 = kls.orth(torch.randn(60, 6, generator=gen, dtype=torch.float64))
    s0 = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    step = torch.randn(60, 6, generator=gen, dtype=torch.float64)
    if kind == "low-rank step":  # a rank-2 step: 4 of the 6 columns bring nothing new (dropped mid-way)
        step = step[:, :2] @ torch.randn(2, 6, generator=gen, dtype=torch.float64)
    if kind == "inside span":  # a column already in span(U0) comes first
        step[:, 0] = (u0 @ torch.randn(6, generator=gen, dtype=torch.float64)) * 1e3
    return u0, u0 @ s0 + 1e-2 * step


@pytest.mark.parametrize("kind", ["full step", "low-rank step", "inside span"])
def test_augment_first_round_equals_the_general_loop(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(len(kind))
    u0, k1 = _case(kind, gen)
    fast = kls.augment(u0, k1)
    _old_paths(monkeypatch)
    old = kls.augment(u0, k1)
    assert fast.shape == old.shape
    assert fast.shape[1] == {"full step": 12, "low-rank step": 8, "inside span": 11}[kind]
    torch.testing.assert_close(fast, old, rtol=0, atol=1e-10)  # same columns, same signs


def test_fused_kl_pass_equals_the_two_branch_graph() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(12, 9, rank=4)
    layer.K = torch.nn.Parameter(layer.U @ layer.S.detach() + 0.1)
    layer.L = torch.nn.Parameter(layer.V @ layer.S.detach().T - 0.1)
    layer.mode, layer.cache = "kl", True
    x = torch.randn(2, 5, 12, requires_grad=True)
    w = torch.randn(2, 5, 9)
    results = []
    for fused in (True, False):
        layer.K.grad = layer.L.grad = x.grad = None
        y = layer(x) if fused else layer._add_bias(layer._core(x))
        if not fused:  # the graph path caches through the output hook of forward(); replay it by hand
            layer._cached.append((x.detach(), None))
            y.register_hook(lambda g: layer._cached.__setitem__(-1, (layer._cached[-1][0], g.detach())))
        (y * w).sum().backward()
        results.append((y.detach(), x.grad, layer.K.grad, layer.L.grad, layer.pop_cache()))
    (y1, gx1, gk1, gl1, c1), (y2, gx2, gk2, gl2, c2) = results
    for a, b in ((y1, y2), (gx1, gx2), (gk1, gk2), (gl1, gl2), (c1[0][0], c2[0][0]), (c1[0][1], c2[0][1])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau,absolute", [(0.1, False), (0.3, False), (0.5, True)])
def test_truncation_rank_is_the_smallest_rank_whose_tail_is_below_theta(tau: float, absolute: bool) -> None:
    sigma = torch.sort(torch.rand(40, generator=torch.Generator().manual_seed(3)) ** 3, descending=True).values
    theta = tau if absolute else tau * float(sigma.double().norm())
    expected = next(r for r in range(41) if float(sigma[r:].double().norm()) < theta)
    assert kls.truncation_rank(sigma, tau, absolute) == expected
    assert not math.isclose(expected, 0) and expected < 40  # the case is not degenerate


def test_digits_training_follows_the_old_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same ranks at every step and the same test accuracy; the loss after 43 steps within 1e-3 (QR rounding)."""
    data = load_digits_split(0)
    common = {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "seed": 0, "data": data, "start_rank": 32}
    fast = train_run("dlrt", 0.1, **common)
    _old_paths(monkeypatch)
    old = train_run("dlrt", 0.1, **common)
    assert [r for _, r in fast["rank_history"]] == [r for _, r in old["rank_history"]]
    assert fast["params"] == old["params"] and fast["accuracy"] == pytest.approx(old["accuracy"], abs=0.005)
    assert fast["loss"] == pytest.approx(old["loss"], rel=1e-3)
