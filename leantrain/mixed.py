"""``--master-weights fp32``: mixed precision — fp32 weights and optimizer, forward and backward under autocast.

``--dtype bf16|fp16`` alone is *pure* low precision (leantrain/precision.py). With ``--master-weights fp32`` the
weights, gradients and optimizer stay fp32 and ``torch.autocast`` runs the matmuls of the forward (and so of the
backward) in the low dtype. fp16's 5-bit exponent underflows small gradients, so fp16 adds torch's dynamic loss
scaler (``torch.amp.GradScaler``): the loss is multiplied by the scale before backward, gradients are unscaled
before clipping, and a step whose gradients overflow is skipped (no update; the scale halves). Skipped steps are
logged per step (``overflow``) and counted in ``skipped_steps``; the scaler's state is checkpointed, so resume is
exact. bf16 has fp32's exponent range and needs no scaler.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .config import TrainConfig
from .precision import torch_dtype


def autocast_calls(task: Any, cfg: TrainConfig, device: torch.device) -> None:
    """Run the task's forward passes (loss, evaluation) under autocast to ``--dtype`` (instance attributes, so the
    loop, checkpoints and method integrators see the same task object)."""
    if not cfg.is_mixed:
        return
    for name in ("loss", "evaluate"):
        setattr(task, name, _under_autocast(getattr(task, name), device.type, torch_dtype(cfg.dtype)))


def _under_autocast(fn: Callable[..., Any], device_type: str, dtype: torch.dtype) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = fn(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    return call


def new_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 mixed precision's dynamic loss scaler (torch's defaults: 2^16, x2 every 2000 clean steps, /2 on
    overflow); None otherwise."""
    if not (cfg.is_mixed and cfg.dtype == "fp16"):
        return None
    return torch.amp.GradScaler(device.type)


def unscale_and_check(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale the gradients in place; True when they overflowed (the caller skips the update)."""
    scaler.unscale_(optimizer)
    state = scaler._per_optimizer_states[id(optimizer)]  # torch keeps the overflow flag here (no public getter)
    return any(bool(found.item()) for found in state["found_inf_per_device"].values())
