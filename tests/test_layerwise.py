"""--layerwise: the optimizer step inside backward (leantrain/layerwise.py).

Equal to the ordinary step with clipping off, resumable bit-exactly, per-parameter clipping, one gradient alive.
"""
from __future__ import annotations

import json

import pytest
import torch

from leantrain.config import TrainConfig
from leantrain.layerwise import LayerwiseStep, live_grad_bytes
from leantrain.train import train

LM = {"task": "causal-lm", "init_weights": "scratch", "arch": "llama", "preset": "tiny", "method": "full",
      "train_size": 64, "val_size": 16, "progress": False, "overwrite": True}


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "lr" in r]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "galore-adamw"])
def test_layerwise_equals_the_ordinary_step(optim: str, tmp_path) -> None:
    opts = dict(LM, optim=optim, steps=8, grad_clip=None, rank=4)
    train(TrainConfig(out=str(tmp_path / "ordinary"), **opts))
    metrics = train(TrainConfig(out=str(tmp_path / "layerwise"), layerwise=True, **opts))
    ordinary, layerwise = _losses(tmp_path / "ordinary"), _losses(tmp_path / "layerwise")
    assert len(ordinary) == len(layerwise) == 8
    assert max(abs(a - b) for a, b in zip(ordinary, layerwise)) <= 1e-6
    assert metrics["layerwise_peak_grad_bytes"] < metrics["grad_bytes"] / 2  # the embedding is the largest


@pytest.mark.parametrize("extra", [{"optim": "galore-adamw8bit", "gap": 2},
                                   {"optim": "adamw", "dtype": "bf16", "bf16_update": "kahan"}])
def test_layerwise_resume_is_bit_exact(extra: dict, tmp_path) -> None:
    opts = dict(LM, steps=6, layerwise=True, rank=4, **extra)
    train(TrainConfig(out=str(tmp_path / "whole"), **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), stop_at=3, **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), resume=True, **{k: v for k,
                                                                   v in opts.items() if k != "overwrite"}))
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "parts")
    whole = (tmp_path / "whole" / "trainable.safetensors").read_bytes()
    assert whole == (tmp_path / "parts" / "trainable.safetensors").read_bytes()


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    return model(x).square().mean() * 100.0  # large gradients, so clipping bites


def test_clipping_is_per_parameter() -> None:
    """--grad-clip C under --layerwise: each parameter's gradient norm is clipped to C on its own."""
    clip = 0.05
    reference = _mlp()
    _loss(reference).backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    LayerwiseStep(opt, model, grad_clip=clip).register()
    _loss(model).backward()
    clipped = 0
    for name, p in model.named_parameters():
        g = grads[name]
        expected = g * min(1.0, clip / (float(g.norm()) + 1e-6))
        clipped += float(g.norm()) > clip
        torch.testing.assert_close(before[name] - p.detach(), expected, rtol=1e-5, atol=1e-7)
        assert p.grad is None  # freed in the hook
    assert clipped >= 3  # the test exercises clipping


def test_only_one_gradient_is_alive() -> None:
    model = _mlp()
    _loss(model).backward()
    ordinary_peak = live_grad_bytes(model)
    model = _mlp()
    hooks = LayerwiseStep(torch.optim.AdamW(model.parameters(), lr=1e-3), model).register()
    _loss(model).backward()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert hooks.peak_grad_bytes == largest < ordinary_peak
    assert live_grad_bytes(model) == 0
    hooks.remove()
    _loss(model).backward()
    assert live_grad_bytes(model) == ordinary_peak  # hooks removed: ordinary gradients again


def test_non_finite_gradient_policies() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    hooks = LayerwiseStep(opt, model, nan_policy="stop").register()
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in 4\.bias"):
        (_loss(model) + model[4].bias.sum() * float("nan")).backward()
    hooks.remove()
    model = _mlp()
    before = model[4].bias.detach().clone()
    hooks = LayerwiseStep(torch.optim.SGD(model.parameters(), lr=1.0), model, nan_policy="skip").register()
    (_loss(model) + model[4].bias.sum() * float("nan")).backward()
    assert hooks.skipped_updates == 1 and torch.equal(model[4].bias.detach(), before)


@pytest.mark.parametrize("change,match", [
    ({"layerwise": True, "method": "dlrt"}, "changes parameter shapes"),
])
def test_refused_in_one_line(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        TrainConfig(**change)
    assert "\n" not in str(err.value)


def test_ddp_needs_its_wrapper() -> None:
    """Under --strategy ddp the step runs in DDP's communication hook, so a bare model cannot be hooked."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        LayerwiseStep(opt, model, strategy="ddp", world=2).register(ddp=model)
