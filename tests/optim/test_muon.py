"""Muon / Muon8bit against torch.optim.Muon (differential) and against the paper's formula (math check).

Tolerances (measured 2026-12-02, 100 steps, 64x96 and 96x32 matrices, lr 1e-2, wd 0.01):
* ``Muon`` vs ``torch.optim.Muon``: bit-identical (max |diff| 0) for every adjust_lr_fn and nesterov setting --
  same EMA momentum, same bf16 Newton-Schulz, same order of the weight-decay and update operations.
* ``Muon`` on a mixed group vs torch Muon (matrices) + torch AdamW (1-D): bit-identical on the matrices, within
  1e-6 relative on the AdamW tensor (leantrain folds the bias correction into eps).
* ``Muon8bit`` vs ``Muon``: relative trajectory distance ||p8 - p32|| / ||p32 - p0|| measured 0.031; bound 0.06.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantrain.optim.muon import Muon, Muon8bit, adjust_lr, newton_schulz

SHAPES = [(64, 96), (96, 32)]


def _params(shapes, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(make, shapes, steps: int = 100, seed: int = 1) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
    params = _params(shapes)
    start = [p.detach().clone() for p in params]
    opt = make(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return start, params


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("how", ["original", "match_rms_adamw"])
def test_matches_torch_muon_bit_for_bit(how, nesterov):
    kw = {"lr": 1e-2, "weight_decay": 0.01, "momentum": 0.95, "nesterov": nesterov, "adjust_lr_fn": how}
    _, ours = _run(lambda ps: Muon(ps, **kw), SHAPES)
    _, ref = _run(lambda ps: torch.optim.Muon(ps, **kw), SHAPES)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_mixed_group_is_torch_muon_plus_torch_adamw():
    shapes = [*SHAPES, (96,)]

    def reference(ps):
        muon = torch.optim.Muon(ps[:2], lr=1e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
        adamw = torch.optim.AdamW(ps[2:], lr=1e-2, weight_decay=0.01)
        return type("Both", (), {"step": lambda self: (muon.step(), adamw.step())})()

    _, ours = _run(lambda ps: Muon(ps, lr=1e-2, weight_decay=0.01), shapes)
    _, ref = _run(reference, shapes)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-6, atol=1e-6)


def test_muon8bit_follows_fp32_muon():
    start, q = _run(lambda ps: Muon8bit(ps, lr=1e-2, weight_decay=0.01, min_8bit_size=0), SHAPES)
    _, ref = _run(lambda ps: Muon(ps, lr=1e-2, weight_decay=0.01), SHAPES)
    dist = math.sqrt(sum(float(((a - b) ** 2).sum().detach()) for a, b in zip(q, ref)))
    moved = math.sqrt(sum(float(((b - s) ** 2).sum().detach()) for b, s in zip(ref, start)))
    assert dist <= 0.06 * moved, dist / moved


def test_one_step_is_the_papers_formula():
    """Step 1 from zero momentum, written out: B = (1-mu) G, M = G + mu (B - G), X0 = M/||M||_F, five quintic
    iterations X <- a X + b (X X^T) X + c (X X^T)^2 X (in fp64 here), W <- W(1 - lr wd) - lr 0.2 sqrt(max(A,B)) X.
    The bf16 iteration of the optimizer agrees to bf16 precision."""
    (w,) = _params([(32, 48)])
    w0 = w.detach().clone().double()
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    w.grad = g.clone()
    lr, wd, mu = 1e-2, 0.1, 0.95
    Muon([w], lr=lr, weight_decay=wd, momentum=mu).step()
    m = g.double() * (1 - mu * mu)  # G + mu ((1 - mu) G - G)
    x = m / m.norm()
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        s = x @ x.T
        x = a * x + b * s @ x + c * s @ s @ x
    expected = w0 * (1 - lr * wd) - lr * 0.2 * math.sqrt(48) * x
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=lr * 0.2 * math.sqrt(48) * 0.05)


def test_newton_schulz_orthogonalises():
    """Singular values of NS5(M) land in ~[0.68, 1.15] (Keller Jordan: roughly within [0.5, 1.5]) for a spectrum
    spanning two decades (measured; four decades leave the smallest at 0.13 -- five steps are not enough there)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(40, 64, generator=gen) @ torch.diag(torch.logspace(-1, 1, 64))
    s = torch.linalg.svdvals(newton_schulz(m))
    assert 0.5 < float(s.min()) and float(s.max()) < 1.5
    assert newton_schulz(m.T).shape == (64, 40)


def test_adjust_lr_and_errors():
    assert adjust_lr((64, 16), "original") == 2.0 and adjust_lr((16, 64), "original") == 1.0
    assert adjust_lr((100, 25), "match_rms_adamw") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="adjust_lr_fn='bogus'"):
        Muon(_params([(4, 4)]), adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="momentum=1.0"):
        Muon(_params([(4, 4)]), momentum=1.0)


def test_muon8bit_keeps_one_byte_per_matrix_weight():
    from leantrain.optim import AdamW8bit

    def state_bytes(cls):
        ps = _params([(256, 512)])
        opt = cls(ps)
        ps[0].grad = torch.randn(256, 512)
        opt.step()
        return opt.state_bytes()

    assert state_bytes(Muon8bit) < 0.55 * state_bytes(AdamW8bit)
