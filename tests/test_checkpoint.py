"""Checkpoint files: optimizer state round trip without pickle, atomic writes, torn folders refused."""
from __future__ import annotations

import torch

import pytest

from leantrain import checkpoint as ckpt
from leantrain.train import lr_factor


def _adamw_after_steps(n: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
    return model, opt


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    model, opt = _adamw_after_steps(3)
    ckpt.save_checkpoint(tmp_path, 3, dict(model.state_dict()), opt.state_dict(), {}, {"cpu": torch.get_rng_state()})
    model_state, opt_state, trainer, rng = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert trainer["step"] == 3
    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(model_state)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.8, 0.9))
    twin_opt.load_state_dict(opt_state)
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_split_join_preserves_structure():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
             "param_groups": [{"params": [0], "betas": (0.9, 0.99), "lr": 0.1, "name": None}]}
    tensors, tree = ckpt.split_state_dict(state)
    back = ckpt.join_state_dict(tensors, tree)
    assert back["param_groups"] == state["param_groups"]
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    with pytest.raises(TypeError, match="object"):
        ckpt.split_state_dict({"bad": object()})


def test_keeps_two_and_refuses_torn(tmp_path):
    model, opt = _adamw_after_steps(1)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, dict(model.state_dict()), opt.state_dict(), {}, {"cpu": torch.get_rng_state()})
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-0000002", "step-0000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    (latest / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(latest)
    assert ckpt.previous_checkpoint(latest).name == "step-0000002"


def test_failed_write_leaves_no_partial_folder(tmp_path):
    with pytest.raises(TypeError):
        ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"bad": object()}, {}, {"cpu": torch.get_rng_state()})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_lr_schedule_warmup_then_linear_decay():
    total = 100
    factors = [lr_factor(s, total, 0.1) for s in range(total)]
    assert factors[:10] == [(s + 1) / 11 for s in range(10)]
    assert factors[10] == 1.0 and factors[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
