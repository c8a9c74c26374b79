"""Apollo / ApolloMini against ``apollo-torch`` (differential, same seeded projections) and the paper's formula.

Tolerances (measured 2026-12-02, 100 steps, lr 1e-2, wd 0.01, 64x96 and 96x32 matrices at rank 4 with a
projection refresh every 25 steps, plus a 1-D tensor under AdamW):
* ``Apollo`` vs ``apollo_torch.APOLLOAdamW`` (channel) on the matrices: max |p - p_ref| 2.4e-7 (float rounding
  order); bound 1e-5 -- the random projections are the same matrices (same per-parameter seeds and seed advance).
* ``ApolloMini`` vs apollo-torch (rank 1, tensor scaling, scale 128) on the matrices: 4.8e-7; bound 1e-5.
* The 1-D tensor (AdamW in both): 2.5e-5, bound 1e-4 -- leantrain's core decays the weight before the update,
  apollo-torch after it, an O(lr^2 wd) difference per step.
* 8-bit states vs fp32 states (rank 32, so the low-rank moments are quantized): ||p8 - p32|| / ||p32 - p0||
  measured 0.009; bound 0.03.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantrain.optim.apollo import Apollo, ApolloMini, next_seed, random_basis

SHAPES = [(64, 96), (96, 32), (96,)]
KW = {"lr": 1e-2, "weight_decay": 0.01, "eps": 1e-6}


def _groups(params: list[nn.Parameter], **extra) -> list[dict]:
    return [{"params": params[:2], **extra}, {"params": params[2:], "rank": None}]


def _peer_groups(params: list[nn.Parameter], **extra) -> list[dict]:
    return [{"params": params[:2], "proj": "random", "proj_type": "std", **extra}, {"params": params[2:]}]


@pytest.mark.peer
@pytest.mark.parametrize("mini", [False, True], ids=["apollo", "apollo-mini"])
def test_matches_apollo_torch(mini, trajectory):
    apollo_torch = pytest.importorskip("apollo_torch")
    keys = ({"rank": 1, "scale": 128.0, "scale_type": "tensor"} if mini
            else {"rank": 4, "scale": 1.0, "scale_type": "channel"})
    cls = ApolloMini if mini else Apollo
    _, ours = trajectory(lambda ps: cls(_groups(ps, update_proj_gap=25, **keys), **KW), SHAPES)
    _, ref = trajectory(lambda ps: apollo_torch.APOLLOAdamW(_peer_groups(ps, update_proj_gap=25, **keys), **KW),
                        SHAPES)
    for a, b, atol in zip(ours, ref, (1e-5, 1e-5, 1e-4)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol)


def test_8bit_states_follow_fp32(trajectory):
    def make(codec):
        return lambda ps: Apollo(_groups(ps, rank=32, update_proj_gap=25), codec=codec, min_8bit_size=0, **KW)

    start, q = trajectory(make("8bit"), SHAPES)
    _, ref = trajectory(make("fp32"), SHAPES)
    dist = math.sqrt(sum(float(((a - b) ** 2).sum().detach()) for a, b in zip(q, ref)))
    moved = math.sqrt(sum(float(((b - s) ** 2).sum().detach()) for b, s in zip(ref, start)))
    assert dist <= 0.03 * moved, dist / moved


def test_one_step_is_the_papers_formula():
    """Step 1 written out for a tall matrix (right projection): R = G P^T, M = (1-b1) R, V = (1-b2) R^2,
    N = M / (sqrt(V) + eps), s_i = ||N_i|| / ||R_i||, W <- W - lr sqrt(1-b2)/(1-b1) (G * s); no limiter at step 1."""
    w = nn.Parameter(torch.randn(12, 8))
    w0 = w.detach().clone().double()
    g = torch.randn(12, 8)
    w.grad = g.clone()
    opt = Apollo([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, rank=3)
    opt.step()
    p = random_basis((12, 8), 3, 1, seed=1).double()  # parameter 1 -> seed 1, right side (12 >= 8)
    torch.testing.assert_close(opt.state[w]["proj_basis"].double(), p)
    r = g.double() @ p.T
    n = (0.1 * r) / ((0.01 * r * r).sqrt() + 1e-6)
    s = n.norm(dim=1, keepdim=True) / (r.norm(dim=1, keepdim=True) + 1e-8)
    expected = w0 - 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9) * g.double() * s
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[w]["proj_seed"] == next_seed(1)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="scale_type='row'"):
        Apollo([nn.Parameter(torch.zeros(4, 4))], scale_type="row")
    with pytest.raises(ValueError, match="proj_type='full'"):
        Apollo([{"params": [nn.Parameter(torch.zeros(4, 4))], "proj_type": "full"}])
