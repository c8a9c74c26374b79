"""Flora against the reference ``flora-opt`` package (differential, same seeded projections) and the formula.

Tolerances (measured 2026-12-02, 100 steps, lr 1e-2, wd 0.01, rank 4, resampling every kappa = 25 steps, a
64x96 and a 96x32 matrix (compressed momentum), a 200x16 matrix (aspect > 4: full momentum) and a 1-D tensor):
* vs ``flora_opt.optimizers.torch.Flora`` with scale_parameter True and False: max |p - p_ref| 7.2e-7;
  bound 1e-5 -- the projections are the same matrices (same per-parameter seeds, split and advance).
* 8-bit momentum vs fp32 momentum: ||p8 - p32|| / ||p32 - p0|| measured 0.032; bound 0.06.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantrain.optim.flora import Flora, down, split_seed, up

SHAPES = [(64, 96), (96, 32), (200, 16), (96,)]
KW = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "kappa": 25, "beta1": 0.9}


@pytest.mark.peer
@pytest.mark.parametrize("relative", [True, False], ids=["scale_parameter", "absolute_lr"])
def test_matches_flora_opt(relative, trajectory):
    pytest.importorskip("flora_opt")
    from flora_opt.optimizers.torch import Flora as Reference

    _, ours = trajectory(lambda ps: Flora(ps, scale_parameter=relative, **KW), SHAPES)
    _, ref = trajectory(lambda ps: Reference(ps, scale_parameter=relative, **KW), SHAPES)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-5)


def test_8bit_momentum_follows_fp32(trajectory):
    start, q = trajectory(lambda ps: Flora(ps, codec="8bit", min_8bit_size=0, scale_parameter=False, **KW), SHAPES)
    _, ref = trajectory(lambda ps: Flora(ps, codec="fp32", scale_parameter=False, **KW), SHAPES)
    dist = math.sqrt(sum(float(((a - b) ** 2).sum().detach()) for a, b in zip(q, ref)))
    moved = math.sqrt(sum(float(((b - s) ** 2).sum().detach()) for b, s in zip(ref, start)))
    assert dist <= 0.06 * moved, dist / moved


def test_two_steps_are_the_papers_formula():
    """Written out for a wide 8x12 matrix (left projection A, rank 2), scale_parameter off, no decay, clipping
    inactive: beta2_t = 1 - t^-0.8, factored v, U = G / sqrt(r c^T / mean(r)), D = 0.1 U + 0.9 A^T C,
    C <- 0.9 C + 0.1 A U."""
    w = nn.Parameter(torch.randn(8, 12))
    w_ref = w.detach().clone().double()
    opt = Flora([w], lr=0.01, rank=2, beta1=0.9, scale_parameter=False, clip_threshold=1e9)
    gen = torch.Generator().manual_seed(4)
    lseed, _ = split_seed(1)  # parameter 1 -> seed 1; wide -> the left seed
    a = torch.randn(2, 8, generator=torch.Generator().manual_seed(lseed)).double() / math.sqrt(2)
    row, col, c = torch.zeros(8, dtype=torch.float64), torch.zeros(12, dtype=torch.float64), torch.zeros(2, 12)
    c = c.double()
    for t in (1, 2):
        g = torch.randn(8, 12, generator=gen)
        w.grad = g.clone()
        opt.step()
        g = g.double()
        b2 = 1 - t ** -0.8
        q = g * g + 1e-30
        row, col = b2 * row + (1 - b2) * q.mean(1), b2 * col + (1 - b2) * q.mean(0)
        u = g / ((row / row.mean())[:, None] * col[None, :]).sqrt()
        d = 0.1 * u + 0.9 * (a.T @ c)
        c = 0.9 * c + 0.1 * (a @ u)
        w_ref = w_ref - 0.01 * d
    torch.testing.assert_close(w.detach().double(), w_ref, rtol=1e-5, atol=1e-6)


def test_resampling_carries_the_momentum_over():
    """At a resample the compressed momentum is decompressed with the old projection and compressed with the new
    one; the seed advances and is never the same twice."""
    x = torch.randn(16, 64)
    c = down(x, 4, seed=7)
    assert c.shape == (4, 64) and up(c, 4, (16, 64), seed=7).shape == (16, 64)
    w = nn.Parameter(torch.randn(16, 64))
    opt = Flora([w], rank=4, kappa=2)
    seeds = []
    for _ in range(6):
        w.grad = torch.randn(16, 64)
        opt.step()
        seeds.append(opt.state[w]["proj_seed"])
    assert seeds[0] != seeds[1] == seeds[2] != seeds[3] == seeds[4] != seeds[5]


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="kappa=0"):
        Flora([nn.Parameter(torch.zeros(4, 4))], kappa=0)
    with pytest.raises(ValueError, match="beta1=1.0"):
        Flora([nn.Parameter(torch.zeros(4, 4))], beta1=1.0)
