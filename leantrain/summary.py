"""The run summary: the ``metrics.json`` dict of a completed ``leantrain train`` run.

Accuracy and losses come from the task, timing from the loop, and the memory figures are per process: under
FSDP2 ``DTensor.numel()`` is the global count, so shards are counted with ``to_local()`` (``dist_utils``).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from .config import DEMO_DATA, DEMO_SIZES, TrainConfig
from .dist_utils import local_bytes, optimizer_state_bytes_local
from .loop import LoopResult
from .memory.rss import peak_rss_bytes
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
        "peak_rss_bytes": peak_rss_bytes(),
        **run.memory_plan,  # the pre-flight estimate beside the measured peak
        **layerwise_figures(run),
    }


def layerwise_figures(run: Run) -> dict[str, int]:
    """--layerwise: the most gradient bytes alive at once (measured in the step hooks; ``grad_bytes`` is what the
    ordinary step would hold); with --grad-accum also the most held between micro-batches (the accumulators)."""
    if run.layerwise is None:
        return {}
    held = {"layerwise_held_grad_bytes": run.layerwise.peak_held_bytes} if run.cfg.grad_accum > 1 else {}
    return {"layerwise_peak_grad_bytes": run.layerwise.peak_grad_bytes, **held}


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
        "steps_this_invocation": span.end - span.start,
        "wall_time_s": time.time() - started,  # this invocation, loading and the final evaluation included
        "loop_time_s": loop.train_time,  # the training steps of this invocation (--eval-every excluded)
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


def _size_note(cfg: TrainConfig, available: tuple[int, int] | None) -> str:
    """Where the counts come from: the demo's default subset, the user's --train-size/--val-size, or all of it."""
    of = f" of {available[0]:,} / {available[1]:,}" if available else ""
    if cfg.data in DEMO_DATA and (cfg.train_size, cfg.val_size) == DEMO_SIZES:
        return f"the demo's default subset{of}; --train-size/--val-size none = all"
    if (cfg.train_size, cfg.val_size) != (None, None):
        return f"--train-size {cfg.train_size} / --val-size {cfg.val_size}{of}"
    return "all of it"


def data_line(run: Run) -> str:
    """One line printed when a run starts: how many examples (or LM blocks) it trains and validates on, and how
    many it left out (subsets, repeated texts); the same counts go into metrics.json."""
    cfg, task = run.cfg, run.task
    counts = getattr(task, "data_counts", None)
    if counts is not None:
        c = counts()
        note = _size_note(cfg, (c["train_examples_available"], c["val_examples_available"]))
        if c.get("duplicates_dropped"):
            note += f"; {c['duplicates_dropped']:,} repeated texts dropped, first kept"
        used = f"{c['train_examples']:,} train / {c['val_examples']:,} validation examples"
    elif hasattr(task, "train_blocks") and hasattr(task, "val_blocks"):
        note = _size_note(cfg, None)
        used = (f"{len(task.train_blocks):,} train / {len(task.val_blocks):,} validation blocks of "
                f"{cfg.max_length} tokens")
    else:
        return f"data                {cfg.data}"
    where = cfg.data + (f" (validation: {cfg.val_data})" if cfg.val_data else "")
    return f"data                {where}: {used} ({note})"


def end_of_run(metrics: dict[str, Any], out: str) -> str:
    """What ``leantrain train`` and ``leantrain.train()`` print when a run ends: the summary, or how to continue an
    interrupted (--stop-at) invocation."""
    if metrics.get("stopped_early"):
        return f"stopped at step {metrics['step']} (--stop-at); continue with: leantrain train --out {out} --resume"
    return format_summary(metrics, out)


def format_summary(m: dict[str, Any], out: str) -> str:
    """Human summary of metrics.json; lines whose metrics a task does not report are left out."""
    mib = 1024 * 1024
    lines = [f"run folder          {out}"]
    if "val_accuracy" in m:
        baselines = [f"majority baseline {m['majority_baseline_accuracy']:.4f}"]
        if m.get("tfidf_baseline_accuracy") is not None:
            baselines.append(f"TF-IDF+LR baseline {m['tfidf_baseline_accuracy']:.4f}")
        lines.append(f"validation accuracy {m['val_accuracy']:.4f}   ({', '.join(baselines)})")
    if "val_perplexity" in m:
        before = m.get("val_perplexity_before")
        lines.append(f"validation perplexity {m['val_perplexity']:.3f}"
                     + (f"   (before training {before:.3f})" if before is not None else ""))
    train_loss = m.get("train_loss_last")
    lines.append(f"validation loss     {m['val_loss']:.4f}" +
                 (f"   train loss (last 20 steps) {train_loss:.4f}" if train_loss is not None else ""))
    here = m.get("steps_this_invocation", m["steps"])  # loop vs wall time: run_summary above
    lines.append(f"steps               {m['steps']}" + (f" ({here} in this invocation)" if here != m["steps"] else "")
                 + f"; training loop {m.get('loop_time_s', m['sec_per_step'] * here):.1f} s "
                 f"({m['sec_per_step']:.3f} s/step), wall clock {m['wall_time_s']:.1f} s (with loading, evaluation, "
                 "saving)")
    lines.append(f"trainable params    {m['trainable_params']:,} of {m['total_params']:,}")
    lines.append(f"memory (MiB)        params {m['param_bytes'] / mib:.1f}  grads {m['grad_bytes'] / mib:.1f}  "
                 f"optimizer state {m['optimizer_state_bytes'] / mib:.2f}  peak RSS {m['peak_rss_bytes'] / mib:.0f}")
    return "\n".join(lines)
