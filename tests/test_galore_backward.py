"""--galore-in-backward (leantrain/galore_backward.py): GaLore's low-rank gradient computed inside the Linear backward.

Checked against today's GaLore (the optimizer projecting the full gradient): the factored product equals the
projection of the full gradient, trajectories agree over refreshes (with and without --layerwise, fp32 and 8-bit
moments, through a state_dict round trip), the full gradient exists only on refresh steps and the gradient bytes
of projected layers are r/m of full in between; bad combinations are refused in one line.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from torch import nn

from leantrain import galore_backward
from leantrain.config import TrainConfig
from leantrain.layerwise import LayerwiseStep
from leantrain.optim.galore import GaLoreAdamW, GaLoreAdamW4bit, GaLoreAdamW8bit
from leantrain.optim.projector import BOTH, LEFT, RIGHT, SUPPLIED_GRAD, project_factors, project_with

GAP, STEPS, RANK = 4, 11, 8  # refreshes at steps 1, 5, 9


@pytest.mark.parametrize("side", [RIGHT, LEFT, BOTH])
def test_project_factors_equals_projecting_the_full_gradient(side: int) -> None:
    gen = torch.Generator().manual_seed(side)
    dy, x = (torch.randn(50, k, generator=gen, dtype=torch.float64) for k in (40, 24))  # G = dy^T x is 40 x 24
    u = torch.linalg.qr(torch.randn(40, 6, generator=gen, dtype=torch.float64)).Q  # left basis, m x r
    vh = torch.linalg.qr(torch.randn(24, 6, generator=gen, dtype=torch.float64)).Q.mT  # right basis, r x n
    basis, right = {RIGHT: (vh, None), LEFT: (u, None), BOTH: (u, vh)}[side]
    expected = project_with(dy.mT @ x, basis, side, right)  # the full gradient, then projected
    torch.testing.assert_close(project_factors(dy, x, basis, side, right), expected, rtol=1e-12, atol=1e-12)


def _stack() -> nn.Sequential:
    torch.manual_seed(0)  # wide (left), tall (right) and square Linears, plus a bias-free one
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 40, bias=False),
                         nn.Tanh(), nn.Linear(40, 10))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(3, 7, 48, generator=gen), torch.randn(3, 7, 10, generator=gen)


def _setup(cls: type, in_backward: bool, layerwise: bool) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = _stack()
    opt = cls(model.parameters(), lr=1e-2, rank=RANK, update_proj_gap=GAP)
    hooks = LayerwiseStep(opt, model).register() if layerwise else None
    if in_backward:
        galore_backward.install(model, opt, on_ready=None if hooks is None else hooks.step_supplied)
    return model, opt, hooks


def _train(cls: type, in_backward: bool, layerwise: bool = False, steps: range = range(STEPS),
           record: list | None = None, start: tuple | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt, hooks = _setup(cls, in_backward, layerwise)
    if start is not None:  # resume: weights and optimizer state of an earlier run, into fresh objects
        model.load_state_dict(start[0])
        opt.load_state_dict(start[1])
    for i in steps:
        opt.zero_grad()
        x, y = _batch(i)
        if hooks is not None:
            hooks.start_step(i)
        (model(x) - y).square().mean().backward()
        if record is not None:
            record.append(_grad_bytes(model, opt))
        if hooks is None:
            opt.step()
        else:
            hooks.finish()
    return model, opt


def _grad_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the weight gradients alive after backward (full ones and the low-rank ones waiting for the step)."""
    full = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.ndim == 2 and p.grad is not None)
    low = sum(st[SUPPLIED_GRAD].numel() * st[SUPPLIED_GRAD].element_size() for st in opt.state.values()
              if SUPPLIED_GRAD in st)
    return full + low


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdamW4bit])
@pytest.mark.parametrize("layerwise", [False, True])
def test_trajectory_equals_galore_across_refreshes(cls: type, layerwise: bool) -> None:
    reference, _ = _train(cls, in_backward=False)
    assert _max_diff(reference, _stack()) > 1e-2  # the weights really moved
    assert _max_diff(reference, _train(cls, in_backward=True, layerwise=layerwise)[0]) <= 1e-5


def test_resume_through_state_dict_is_exact() -> None:
    whole, _ = _train(GaLoreAdamW8bit, in_backward=True)
    first, opt = _train(GaLoreAdamW8bit, in_backward=True, steps=range(6))  # stops between refreshes 5 and 9
    saved = (copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict()))
    resumed, _ = _train(GaLoreAdamW8bit, in_backward=True, steps=range(6, STEPS), start=saved)
    assert _max_diff(whole, resumed) == 0.0


def test_full_gradient_only_on_refresh_steps_and_r_over_m_bytes_between() -> None:
    full, low = [], []
    _train(GaLoreAdamW, in_backward=False, record=full)
    _train(GaLoreAdamW, in_backward=True, record=low)
    refresh = [i for i in range(STEPS) if i % GAP == 0]
    assert [low[i] for i in refresh] == [full[i] for i in refresh]
    model = _stack()
    projected = [p for p in model.parameters() if p.ndim == 2 and min(p.shape) > RANK]
    bound = sum(RANK * max(p.shape) * 4 for p in projected) + sum(p.numel() * 4 for p in model.parameters()
                                                                  if p.ndim == 2 and min(p.shape) <= RANK)
    for i in set(range(STEPS)) - set(refresh):
        assert low[i] <= 1.1 * bound, (i, low[i], bound)  # r x (larger side) per projected matrix
        assert low[i] < 0.35 * full[i]


def test_nothing_projected_is_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Embedding(10, 16))
    opt = GaLoreAdamW(model.parameters(), rank=4)
    with pytest.raises(ValueError, match="no nn.Linear weight of Sequential is projected"):
        galore_backward.install(model, opt)


def test_remove_restores_the_ordinary_backward() -> None:
    model = _stack()
    opt = GaLoreAdamW(model.parameters(), rank=RANK, update_proj_gap=GAP)
    handle = galore_backward.install(model, opt)
    for i in range(2):
        opt.zero_grad()
        x, y = _batch(i)
        (model(x) - y).square().mean().backward()
        opt.step()
    handle.remove()
    opt.zero_grad()
    x, y = _batch(2)
    (model(x) - y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


LM = {"task": "causal-lm", "init_weights": "scratch", "arch": "llama", "preset": "nano", "method": "full",
      "train_size": 32, "val_size": 8, "batch_size": 4, "progress": False, "overwrite": True, "grad_clip": None,
      "rank": 4, "gap": 3}


@pytest.mark.parametrize("bad,match", [
    ({"optim": "adamw"}, "needs --optim galore-adamw"),
    ({"optim": "galore-adamw", "grad_clip": 1.0}, "needs --grad-clip none"),
    ({"optim": "galore-adamw", "dtype": "bf16", "master_weights": "fp32"}, "cannot run under autocast"),
])
def test_config_refuses_what_it_cannot_do(bad: dict, match: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.galore_in_backward=True {match}"):
        TrainConfig(out=str(tmp_path), galore_in_backward=True, **{**LM, **bad})


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "lr" in r]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"layerwise": True}, {"activation_checkpointing": True}])
def test_tiny_llama_run_equals_galore(extra: dict, tmp_path) -> None:
    from leantrain.train import train

    opts = dict(LM, optim="galore-adamw", steps=7, **extra)
    train(TrainConfig(out=str(tmp_path / "today"), **opts))
    train(TrainConfig(out=str(tmp_path / "inside"), galore_in_backward=True, **opts))
    today, inside = _losses(tmp_path / "today"), _losses(tmp_path / "inside")
    assert len(today) == len(inside) == 7 and today[0] != today[-1]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(today, inside)), (today, inside)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"optim": "galore-adamw8bit"}, {"optim": "galore-adamw", "layerwise": True,
                                                                   "dtype": "bf16", "bf16_update": "kahan"}])
def test_tiny_llama_resume_is_bit_exact(extra: dict, tmp_path) -> None:
    from leantrain.train import train

    opts = dict(LM, steps=6, galore_in_backward=True, **extra)
    train(TrainConfig(out=str(tmp_path / "whole"), **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), stop_at=4, **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), resume=True, **{k: v for k, v in opts.items() if k != "overwrite"}))
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "parts")
    assert ((tmp_path / "whole" / "trainable.safetensors").read_bytes()
            == (tmp_path / "parts" / "trainable.safetensors").read_bytes())


@pytest.mark.slow
def test_tiny_llama_bf16_stays_close_to_galore(tmp_path) -> None:
    """bf16: the factored product rounds differently from building the bf16 gradient first; same training."""
    from leantrain.train import train

    opts = dict(LM, optim="galore-adamw", steps=7, dtype="bf16")
    train(TrainConfig(out=str(tmp_path / "today"), **opts))
    train(TrainConfig(out=str(tmp_path / "inside"), galore_in_backward=True, **opts))
    today, inside = _losses(tmp_path / "today"), _losses(tmp_path / "inside")
    assert abs(today[-1] - inside[-1]) <= 0.02 * abs(today[-1]), (today, inside)
