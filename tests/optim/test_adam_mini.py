"""AdamMini against the reference ``adam_mini`` package (differential) and against the paper's formula.

Tolerances (measured 2026-12-02, 100 steps, lr 1e-2, wd 0.1, a q/k/v/mlp/embedding/norm/bias mix):
* ``AdamMini`` (fp32) vs ``adam_mini.Adam_mini`` 1.1.1 with the same partition: max |p - p_ref| 2.4e-7 (float
  rounding order of lr / bias correction); bound 1e-5.
* ``AdamMini8bit`` vs ``AdamMini``: ||p8 - p32|| / ||p32 - p0|| measured 0.017; bound 0.03.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantrain.optim.adam_mini import AdamMini, AdamMini8bit, adam_mini_groups, block_numel

DIM, HEADS = 32, 4
SHAPES = {"embed_tokens.weight": (50, DIM), "layer.q_proj.weight": (DIM, DIM), "layer.k_proj.weight": (DIM, DIM),
          "layer.v_proj.weight": (DIM, DIM), "layer.o_proj.weight": (DIM, DIM), "layer.mlp.up.weight": (48, DIM),
          "layer.mlp.up.bias": (48,), "layer.input_layernorm.weight": (DIM,), "lm_head.weight": (50, DIM)}


def _named(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, nn.Parameter(torch.randn(s, generator=gen))) for n, s in SHAPES.items()]


def _run(make, steps: int = 100) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
    named = _named()
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params]
    opt = make(named)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** (-2 * torch.rand(p.shape, generator=gen))
        opt.step()
    return start, params


@pytest.mark.peer
def test_matches_the_reference_package():
    adam_mini = pytest.importorskip("adam_mini")
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    _, ours = _run(lambda named: AdamMini(adam_mini_groups(named, DIM, HEADS, kw["weight_decay"]), **kw))
    _, ref = _run(lambda named: adam_mini.Adam_mini(named, dim=DIM, n_heads=HEADS, verbose=False, **kw))
    for (name, _), a, b in zip(SHAPES.items(), ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-5, msg=name)


def test_8bit_first_moment_follows_fp32():
    def make(cls):
        return lambda named: cls(adam_mini_groups(named, DIM, HEADS, 0.1), lr=1e-2, weight_decay=0.1,
                                 min_8bit_size=0)

    start, q = _run(make(AdamMini8bit))
    _, ref = _run(make(AdamMini))
    dist = math.sqrt(sum(float(((a - b) ** 2).sum().detach()) for a, b in zip(q, ref)))
    moved = math.sqrt(sum(float(((b - s) ** 2).sum().detach()) for b, s in zip(ref, start)))
    assert dist <= 0.03 * moved, dist / moved


def test_one_step_is_the_papers_formula():
    """Two steps written out for a per-row matrix: v_row = b2 v + (1-b2) mean_row(g^2), W -= lr/bc1 m /
    (sqrt(v_row / bc2) + eps) after W *= 1 - lr wd."""
    w = nn.Parameter(torch.randn(6, 10))
    w_ref = w.detach().clone().double()
    opt = AdamMini([w], lr=0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.5)
    m, v = torch.zeros(6, 10, dtype=torch.float64), torch.zeros(6, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    for t in (1, 2):
        g = torch.randn(6, 10, generator=gen)
        w.grad = g.clone()
        opt.step()
        g = g.double()
        m = 0.8 * m + 0.2 * g
        v = 0.9 * v + 0.1 * (g * g).mean(dim=1, keepdim=True)
        w_ref = w_ref * (1 - 0.1 * 0.5) - 0.1 / (1 - 0.8**t) * m / ((v / (1 - 0.9**t)).sqrt() + 1e-3)
    torch.testing.assert_close(w.detach().double(), w_ref, rtol=1e-6, atol=1e-6)
    assert opt.state[w]["exp_avg_sq"].shape == (6,)


def test_partition_and_errors():
    groups = adam_mini_groups(_named(), DIM, HEADS, 0.1)
    parts = {n: (g["partition"], block_numel(g["params"][0], g), g["weight_decay"])
             for n, g in zip(SHAPES, groups)}
    assert parts["layer.q_proj.weight"] == ("head", DIM * DIM // HEADS, 0.1)
    assert parts["embed_tokens.weight"] == ("row", DIM, 0.1)
    assert parts["layer.mlp.up.bias"] == ("element", 1, 0.0)
    assert parts["layer.input_layernorm.weight"] == ("tensor", DIM, 0.0)
    with pytest.raises(ValueError, match="partition='block'"):
        AdamMini([nn.Parameter(torch.zeros(3))], partition="block")
    with pytest.raises(ValueError, match="head_numel=7"):
        p = nn.Parameter(torch.zeros(4, 4))
        opt = AdamMini([p], partition="head", head_numel=7)
        p.grad = torch.ones(4, 4)
        opt.step()
