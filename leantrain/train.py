"""``leantrain train``, top to bottom: validate the run folder, assemble the run, resume or start, loop, finish.

config -> run folder -> ``run.build_run`` (task, quantized base, method, head group, DDP/FSDP, optimizer)
-> ``checkpoint.restore_run`` or a fresh folder -> ``loop.train_steps`` (closure, log, eval, checkpoint)
-> final evaluation, artifacts and ``summary.run_summary`` (``metrics.json`` marks the run complete).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from . import checkpoint as ckpt
from . import dist
from .config import TrainConfig
from .loop import LoopResult, StepSpan, lr_factor, stop_early, train_steps  # noqa: F401  (lr_factor: re-exported)
from .report import StepLog, plot_losses, read_jsonl, write_summary
from .run import Run, build_run, build_task  # noqa: F401  (build_task: re-exported for benchmarks)
from .run import wrap_for_distributed as _wrap_for_distributed  # noqa: F401  (used by benchmarks/distributed.py)
from .summary import run_summary

# Fields that may differ between the original run and a --resume invocation.
PER_INVOCATION = {"resume", "stop_at", "progress", "overwrite"}
RUNTIME_FIELDS = {"resume", "stop_at", "progress", "save_every", "eval_every", "steps", "overwrite", "device",
                  "strategy"}


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, TrainConfig]:
    """Validate the output folder; on --resume return the saved config (runtime fields from the new one)."""
    run_dir = Path(cfg.out)
    saved = run_dir / "config.json"
    if cfg.resume:
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} has no config.json to resume from")
        old = TrainConfig.load(saved)
        changed = [k for k, v in vars(cfg).items() if k not in RUNTIME_FIELDS and getattr(old, k) != v
                   and v != getattr(TrainConfig(), k)]
        if changed:
            raise ValueError(f"--resume: option(s) {', '.join(changed)} differ from {saved}; drop them to resume")
        # Per-invocation fields come from this call; the others keep the run's values unless given anew.
        defaults = TrainConfig()
        runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS
                   if k in PER_INVOCATION or getattr(cfg, k) != getattr(defaults, k)}
        return run_dir, replace(old, **runtime)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"run folder {run_dir} is not empty; pass --resume to continue it or "
                              "--overwrite to replace it")
    return run_dir, cfg  # with --overwrite the old folder is removed only once every input has been validated


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; under torchrun every process calls this and rank 0 writes the outputs."""
    ctx = dist.init_from_env(cfg.device, cfg.strategy)
    try:
        return _train(cfg, ctx)
    finally:
        dist.shutdown(ctx)


def _train(cfg: TrainConfig, ctx: dist.DistContext) -> dict[str, Any]:
    """The job on this process: the summary (rank 0), a short per-rank result, or a --stop-at marker."""
    started = time.time()
    # Everything that can fail is validated before the run folder is touched.
    run_dir, cfg = dist.on_main(ctx, lambda: prepare_run_dir(cfg))
    run = build_run(cfg, ctx)
    ckpt.refuse_unsaveable(run)
    start = ckpt.restore_run(run, run_dir) if cfg.resume else 0
    if not cfg.resume and ctx.is_main:
        start_run_dir(run, run_dir)
    span = StepSpan.of(cfg, run.task.batches_per_epoch(), start)
    log = StepLog(run_dir / "metrics.jsonl", resume_step=start if cfg.resume else None) if ctx.is_main else None
    save = partial(ckpt.save_run, run, run_dir, started=started)
    result = train_steps(run, span, log, save)
    if span.stops_early:  # an interrupted (--stop-at) invocation: leave a checkpoint, not a summary
        return stop_early(run, span, log, save)
    return finish(run, run_dir, log, result, started)


def start_run_dir(run: Run, run_dir: Path) -> None:
    """A fresh run folder (an old one only goes now, with --overwrite) holding config.json and the task's files."""
    if run.cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(run_dir / "config.json", run.cfg.to_json() + "\n")
    run.task.write_run_files(run_dir)


def finish(run: Run, run_dir: Path, log: StepLog | None, result: LoopResult, started: float) -> dict[str, Any]:
    """Final evaluation, artifacts and summary; ``metrics.json``, written last, marks the run complete."""
    final_state = ckpt.trainable_state(run)  # a collective under FSDP: every rank
    final = {f"val_{k}": v for k, v in run.task.evaluate().items()}
    run.task.save_artifacts(run_dir, write=run.ctx.is_main)
    if not run.ctx.is_main:
        return {"step": result.span.end, "rank": run.ctx.rank, **final}
    log.write({"step": result.span.end, **final})
    log.close()
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in final_state.items()},
              str(run_dir / "trainable.safetensors"))
    method_artifacts = getattr(run.method, "save_artifacts", None)
    if method_artifacts and not run.fsdp:
        method_artifacts(run.model, run_dir, run.cfg)
    records = read_jsonl(run_dir / "metrics.jsonl")
    metrics = run_summary(run, final, final_state, records, result, started)
    plot_losses(records, run_dir / "loss.png", title=f"{run.cfg.method} + {run.cfg.optim} on {run.cfg.data}")
    write_summary(run_dir / "metrics.json", metrics)
    return metrics
