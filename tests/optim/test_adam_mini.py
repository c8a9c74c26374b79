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


NANO = {"task": "causal-lm", "init_weights": "scratch", "preset": "nano", "method": "full", "train_size": 8,
        "val_size": 4, "batch_size": 2, "max_length": 16, "progress": False, "weight_decay": 0.1}


def test_run_groups_carry_names_and_get_the_papers_partition():
    """``--optim adam-mini`` as the trainer builds it: Q/K per head (head_dim whole rows), V/O/MLP/embedding/head
    per row, norm weights per tensor without weight decay."""
    from leantrain.config import TrainConfig
    from leantrain.run import build_run

    run = build_run(TrainConfig(optim="adam-mini", **NANO))
    conf = run.model.config
    head_numel = conf.hidden_size // conf.num_attention_heads * conf.hidden_size
    seen = {}
    for g in run.optimizer.param_groups:
        (name,), (p,) = g["names"], g["params"]
        seen[name] = (g["partition"], g["head_numel"], g["weight_decay"])
        assert block_numel(p, g) == {"head": head_numel, "row": p.numel() // p.shape[0], "tensor": p.numel(),
                                     "element": 1}[g["partition"]]
    kinds = {n.split(".")[-2]: v for n, v in seen.items()}
    assert kinds["q_proj"] == kinds["k_proj"] == ("head", head_numel, 0.1)
    assert kinds["v_proj"][0] == kinds["o_proj"][0] == kinds["down_proj"][0] == kinds["embed_tokens"][0] == "row"
    assert kinds["input_layernorm"] == ("tensor", None, 0.0)
    assert len(seen) == len(list(run.model.parameters()))


@pytest.mark.peer
def test_registry_adam_mini_on_named_run_groups_matches_the_reference():
    """The trainer's groups (names from the run assembly, head_dim from the model config), fp32 first moment, vs
    ``adam_mini.Adam_mini(model.named_parameters(), dim, n_heads)`` on a copy: 100 steps of random gradients,
    max |p - p_ref| measured 2.4e-7; bound 1e-5."""
    adam_mini = pytest.importorskip("adam_mini")
    from leantrain.config import TrainConfig
    from leantrain.run import build_run

    cfg = TrainConfig(optim="adam-mini", lr=1e-2, **NANO)
    run = build_run(cfg)
    for g in run.optimizer.param_groups:
        g["codec"] = "fp32"  # the registered 8-bit first moment is checked against fp32 above
    named = list(run.model.named_parameters())
    copies = [(n, nn.Parameter(p.detach().clone())) for n, p in named]
    conf = run.model.config
    ref = adam_mini.Adam_mini(copies, lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=0.1,
                              dim=conf.hidden_size, n_heads=conf.num_attention_heads,
                              n_kv_heads=conf.num_key_value_heads, verbose=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        for (_, p), (_, q) in zip(named, copies):
            g = torch.randn(p.shape, generator=gen) * 10.0 ** (-2 * torch.rand(p.shape, generator=gen))
            p.grad, q.grad = g, g.clone()
        run.optimizer.step()
        ref.step()
    worst = max(float((p.detach() - q.detach()).abs().max()) for (_, p), (_, q) in zip(named, copies))
    assert worst <= 1e-5, worst
