"""The run summary: the ``metrics.json`` dict of a completed ``leantrain train`` run.

Accuracy and losses come from the task, timing from the loop, and the memory figures are per process: under
FSDP2 ``DTensor.numel()`` is the global count, so shards are counted with ``to_local()`` (``dist_utils``).
"""
from __future__ import annotations

import math
import resource
import time
from typing import Any

import torch

from .dist_utils import local_bytes, optimizer_state_bytes_local
from .loop import LoopResult
from .run import Run, trainable_parameters

LAST_LOSSES = 20  # train_loss_last averages this many final finite step losses


def train_loss_last(records: list[dict[str, Any]]) -> float | None:
    """Mean of the last finite training losses: one step's loss is too noisy to compare runs by."""
    losses = [r["loss"] for r in records if "loss" in r and math.isfinite(r["loss"])][-LAST_LOSSES:]
    return sum(losses) / len(losses) if losses else None


def memory_figures(run: Run, final_state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameter counts and the bytes this process holds for weights, gradients and optimizer state."""
    model, trainable = run.model, trainable_parameters(run.model)
    counted = [p for p in final_state.values() if p.is_floating_point()] if run.fsdp else trainable
    return {
        "trainable_params": sum(p.numel() for p in counted),
        "total_params": sum(p.numel() for p in model.parameters()),
        "param_bytes": local_bytes(model.parameters()) + local_bytes(model.buffers()),
        "grad_bytes": local_bytes(trainable),
        "optimizer_state_bytes": optimizer_state_bytes_local(run.optimizer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **layerwise_figures(run),
    }


def layerwise_figures(run: Run) -> dict[str, int]:
    """--layerwise: the most gradient bytes alive at once (measured in the step hooks; ``grad_bytes`` is what the
    ordinary step would hold)."""
    return {"layerwise_peak_grad_bytes": run.layerwise.peak_grad_bytes} if run.layerwise is not None else {}


def run_summary(run: Run, final: dict[str, float], final_state: dict[str, torch.Tensor],
                records: list[dict[str, Any]], loop: LoopResult, started: float) -> dict[str, Any]:
    """The metrics dict: final validation, task extras, timing, memory, and the method's own metrics (ranks)."""
    cfg, ctx, span = run.cfg, run.ctx, loop.span
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "optim": cfg.optim,
        "dtype": cfg.dtype,
        **final,
        **run.task.summary(),
        "train_loss_last": train_loss_last(records),
        "steps": span.end,
        "skipped_steps": loop.skipped,
        "wall_time_s": time.time() - started,
        "sec_per_step": loop.train_time / max(1, span.end - span.start),  # loop only, this invocation
        **memory_figures(run, final_state),
        "device": str(ctx.device),
        "world_size": ctx.world,
        "strategy": ctx.strategy,
    }
    method_metrics = getattr(run.method, "metrics", None)
    if method_metrics:
        metrics.update(method_metrics(run.model))
    return metrics
