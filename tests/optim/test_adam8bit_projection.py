"""Projection hook call sites of the Adam core (OPTIM_CONTRACT.md) against a hand-written GaLore step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain.optim import AdamW, AdamW8bit

pytest.importorskip("leantrain.optim.projector")


def _reference(p0, grads, lr, betas, eps, wd, rank, scale, gap):
    """GaLore-AdamW (Zhao et al. 2024, Alg. 2) with a right projector from a full SVD (tall matrix)."""
    p = p0.clone()
    m = v = P = None
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            P = torch.linalg.svd(g, full_matrices=False)[2][:rank]  # r x n
        r = g @ P.T
        m = torch.zeros_like(r) if m is None else m
        v = torch.zeros_like(r) if v is None else v
        m = betas[0] * m + (1 - betas[0]) * r
        v = betas[1] * v + (1 - betas[1]) * r * r
        n = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        p = p * (1 - lr * wd) - lr * scale * (n @ P)
    return p


def _grads(shape, steps):
    g = torch.Generator().manual_seed(4)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def test_adamw_projection_matches_reference():
    p0 = torch.randn(96, 40, generator=torch.Generator().manual_seed(2))
    grads = _grads(p0.shape, 5)
    p = nn.Parameter(p0.clone())
    opt = AdamW([{"params": [p], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std",
                  "svd": "full"}], lr=1e-2, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = _reference(p0, grads, 1e-2, (0.9, 0.999), 1e-8, 0.1, 4, 0.25, 3)
    assert torch.allclose(p.detach(), ref, atol=1e-5, rtol=0)
    st = opt.state[p]
    assert st["exp_avg"].numel() == 96 * 4 and "proj_basis" in st


def test_8bit_projected_moments_and_roundtrip():
    p0 = torch.randn(512, 64, generator=torch.Generator().manual_seed(3))
    grads = _grads(p0.shape, 4)
    group = {"rank": 16, "update_proj_gap": 2, "scale": 0.25, "svd": "full"}
    a = nn.Parameter(p0.clone())
    oa = AdamW8bit([{"params": [a], **group}], lr=1e-3, min_8bit_size=1024)
    for g in grads[:2]:
        a.grad = g.clone()
        oa.step()
    assert oa.state[a]["exp_avg_codes"].numel() == 512 * 16  # moments in the low-rank shape, 8-bit
    b = nn.Parameter(a.detach().clone())
    ob = AdamW8bit([{"params": [b], **group}], lr=1e-3, min_8bit_size=1024)
    ob.load_state_dict(oa.state_dict())
    for g in grads[2:]:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    ref = _reference(p0, grads, 1e-3, (0.9, 0.999), 1e-8, 1e-2, 16, 0.25, 2)
    assert ((a.detach() - ref).norm() / (ref - p0).norm()).item() < 0.05
