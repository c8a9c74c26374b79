"""Fira against the reference ``fira`` package (differential) and the paper's formula.

Tolerances (measured 2026-12-02, 100 steps, lr 1e-2, wd 0.01, 64x96 and 96x32 matrices at rank 4 with an SVD
refresh every 25 steps, plus a 1-D tensor under AdamW):
* matrices vs ``fira.FiraAdamW``: max |p - p_ref| 4.8e-7; bound 1e-5 -- both take the same full SVD of the
  same gradient (the sign of a singular vector is whatever LAPACK returns, the same call in both), the rest is
  float rounding order;
* the 1-D tensor (AdamW in both): 2.5e-5; bound 1e-4 -- leantrain's core decays the weight before the
  update, fira after it (O(lr^2 wd) per step).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantrain.optim.fira import Fira

SHAPES = [(64, 96), (96, 32), (96,)]
KW = {"lr": 1e-2, "weight_decay": 0.01, "eps": 1e-6}


@pytest.mark.peer
def test_matches_the_reference_package(trajectory):
    fira = pytest.importorskip("fira")
    _, ours = trajectory(lambda ps: Fira([{"params": ps[:2], "rank": 4, "update_proj_gap": 25},
                                          {"params": ps[2:], "rank": None}], **KW), SHAPES)
    _, ref = trajectory(lambda ps: fira.FiraAdamW([{"params": ps[:2], "rank": 4, "update_proj_gap": 25,
                                                    "alpha": 1.0, "proj_type": "std"}, {"params": ps[2:]}], **KW),
                        SHAPES)
    for a, b, atol in zip(ours, ref, (1e-5, 1e-5, 1e-4)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol)


def test_one_step_is_the_papers_formula():
    """Step 1 written out for a wide matrix (left basis U_r of G): R = U^T G, N = M / (sqrt(V) + eps) with
    M = (1-b1) R, V = (1-b2) R^2; phi_j = ||N_:j|| / ||R_:j||; W <- W - lr sqrt(1-b2)/(1-b1) (U N + (G - U R) phi)."""
    w = nn.Parameter(torch.randn(8, 12))
    w0 = w.detach().clone().double()
    g = torch.randn(8, 12)
    w.grad = g.clone()
    opt = Fira([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, rank=3)
    opt.step()
    u = torch.linalg.svd(g.double(), full_matrices=False).U[:, :3]
    u = u * torch.sign((u * opt.state[w]["proj_basis"].double()).sum(0))  # the singular vectors' signs
    r = u.T @ g.double()
    n = (0.1 * r) / ((0.01 * r * r).sqrt() + 1e-6)
    phi = n.norm(dim=0) / (r.norm(dim=0) + 1e-8)
    expected = w0 - 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9) * (u @ n + (g.double() - u @ r) * phi)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-5)


def test_update_is_full_rank_and_limited():
    """The residual term makes the step full-rank although the state is rank 2; the limiter keeps the residual's
    norm from growing by more than 1 % a step when the gradient suddenly grows 100x."""
    w = nn.Parameter(torch.zeros(16, 16))
    opt = Fira([w], lr=1.0, rank=2)
    w.grad = torch.randn(16, 16)
    opt.step()
    assert torch.linalg.matrix_rank(w.detach()) > 2
    before = opt.state[w]["limiter_norm"].clone()
    w.grad = torch.randn(16, 16) * 100
    opt.step()
    assert float(opt.state[w]["limiter_norm"]) <= 1.01 * float(before) * (1 + 1e-6)


def test_refuses_reprojected_moments():
    with pytest.raises(ValueError, match="refresh_moments='reproject'"):
        Fira([{"params": [nn.Parameter(torch.zeros(4, 4))], "refresh_moments": "reproject"}])
