"""``leantrain train``, top to bottom: validate the run folder, assemble the run, resume or start, loop, finish.

config -> run folder -> ``run.build_run`` (task, quantized base, method, head group, DDP/FSDP, optimizer)
-> ``checkpoint.restore_run`` or a fresh folder -> ``loop.train_steps`` (closure, log, eval, checkpoint)
-> final evaluation, artifacts and ``summary.run_summary`` (``metrics.json`` marks the run complete).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import types
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import dist
from .config import TrainConfig
from .loop import LoopResult, StepSpan, lr_factor, stop_early, train_steps  # noqa: F401  (lr_factor: re-exported)
from .report import TENSORBOARD_DIR, StepLog, plot_losses, read_jsonl, write_summary
from .run import Run, build_run, build_task  # noqa: F401  (build_task: re-exported for benchmarks)
from .run import wrap_for_distributed as _wrap_for_distributed  # noqa: F401  (used by benchmarks/distributed.py)
from .summary import data_line, end_of_run, run_summary
from .tfevents import read_scalars

# Fields that may differ between the original run and a --resume invocation.
PER_INVOCATION = {"resume", "stop_at", "progress", "overwrite"}
RUNTIME_FIELDS = {"resume", "stop_at", "progress", "save_every", "eval_every", "steps", "overwrite", "device",
                  "strategy", "report_to"}
# What leantrain writes into a run folder before the first step: a folder holding only these, with no logged step,
# is the leftover of a run that failed to start, and a new run may replace it.
START_FILES = {"config.json", "labels.json", "lm.json", "metrics.jsonl", TENSORBOARD_DIR}


def _defaults_for(cfg: TrainConfig) -> dict[str, Any]:
    """Field defaults as ``cfg`` got them: --train-size/--val-size auto depend on the data ``cfg`` names."""
    sized = TrainConfig(task=cfg.task, init_weights=cfg.init_weights, data=cfg.data)
    return {**vars(TrainConfig()), "train_size": sized.train_size, "val_size": sized.val_size}


def resume_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The saved config with this invocation's runtime fields; a changed run field (the lr schedule, the batches)
    is refused naming both values; a new --steps is announced (it re-plans the schedule, e.g. to extend a run)."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} has no config.json to resume from")
    old, defaults = TrainConfig.load(saved), _defaults_for(cfg)
    changed = [f"{_flag(k)} {v!r} (the run's: {getattr(old, k)!r})" for k, v in vars(cfg).items()
               if k not in RUNTIME_FIELDS and getattr(old, k) != v and v != defaults[k]]
    if changed:
        raise ValueError(f"--resume: {', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from {saved}; "
                         "drop to resume, or start a new --out")
    # Per-invocation fields come from this call; the others keep the run's values unless given anew.
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS
               if k in PER_INVOCATION or getattr(cfg, k) != defaults[k]}
    if "steps" in runtime and runtime["steps"] != old.steps:
        before = old.steps if old.steps is not None else f"{old.epochs or 1:g} epoch(s)"
        print(f"resume: --steps {runtime['steps']} replaces the run's {before} (the lr schedule is planned "
              f"over {runtime['steps']} steps from the checkpoint on)")
    return replace(old, **runtime)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def logged_steps(run_dir: Path) -> int:
    """Steps recorded in the folder's metrics.jsonl and TensorBoard events (0: the run never finished a step)."""
    jsonl = run_dir / "metrics.jsonl"
    steps = [r.get("step", 0) for r in read_jsonl(jsonl)] if jsonl.is_file() else []
    if (run_dir / TENSORBOARD_DIR).is_dir():
        steps += [s for points in read_scalars(run_dir / TENSORBOARD_DIR).values() for s, _ in points]
    return max(steps, default=0)


def check_new_run_dir(run_dir: Path) -> bool:
    """May a new run use ``run_dir``? True when it must first remove the leftover of a run that never finished a
    step; a folder with anything else is refused in one line saying what it holds and what to pass."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return False
    names = {p.name for p in run_dir.iterdir()}
    unstarted = "config.json" in names and names <= START_FILES
    if unstarted and logged_steps(run_dir) == 0:
        return True
    if "config.json" in names and not (run_dir / "metrics.json").is_file() and not ckpt.latest_checkpoint(run_dir):
        raise FileExistsError(f"run folder {run_dir} holds a run stopped at step {logged_steps(run_dir)} without a "
                              "checkpoint (nothing to --resume); pass --overwrite to replace it")
    raise FileExistsError(f"run folder {run_dir} is not empty; pass --resume to continue it or "
                          "--overwrite to replace it")


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, TrainConfig]:
    """Validate the output folder; on --resume return the saved config (runtime fields from the new one)."""
    run_dir = Path(cfg.out)
    if cfg.resume:
        return run_dir, resume_config(cfg, run_dir)
    if not cfg.overwrite and check_new_run_dir(run_dir):
        print(f"replacing {run_dir}: the run that wrote it stopped before its first step")
    return run_dir, cfg  # the old folder is removed only once every input has been validated (start_run_dir)


def completed_run(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """--resume of a finished run: its summary, announced, instead of an empty loop and a rewritten summary;
    a run with no checkpoint is refused in one line. None: there is something to resume."""
    summary = run_dir / "metrics.json"
    if summary.is_file():
        metrics = json.loads(summary.read_text())
        done = metrics.get("steps", 0)
        if cfg.steps is None or cfg.steps <= done:
            print(f"run folder {run_dir} is already complete ({done} steps); nothing to resume (pass a larger "
                  "--steps to extend it)")
            return {**metrics, "already_complete": True}
    if ckpt.latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint (the run stopped at step "
                                f"{logged_steps(run_dir)} before saving one; --save-every N writes them); "
                                "start again with --overwrite")
    return None


def train(cfg: TrainConfig, verbose: bool = True) -> dict[str, Any]:
    """Run one training job; under torchrun every process calls this and rank 0 writes the outputs.

    ``verbose`` (rank 0): print the data line when the run starts and the summary when it ends, as ``leantrain
    train`` does (it calls this); ``False`` for callers that report runs themselves."""
    ctx = dist.init_from_env(cfg.device, cfg.strategy)
    try:
        metrics = _train(cfg, ctx, verbose)
    finally:
        dist.shutdown(ctx)
    if verbose and ctx.is_main:
        print(end_of_run(metrics, cfg.out))
    return metrics


def _train(cfg: TrainConfig, ctx: dist.DistContext, verbose: bool = True) -> dict[str, Any]:
    """The job on this process: the summary (rank 0), a short per-rank result, or a --stop-at marker."""
    started = time.time()
    # Everything that can fail is validated before the run folder is touched.
    run_dir, cfg = dist.on_main(ctx, lambda: prepare_run_dir(cfg))
    if cfg.resume:
        complete = dist.on_main(ctx, lambda: completed_run(run_dir, cfg))
        if complete is not None:
            return complete if ctx.is_main else {"rank": ctx.rank, "already_complete": True}
    run = build_run(cfg, ctx)
    ckpt.refuse_unsaveable(run)
    if verbose and ctx.is_main:
        print(data_line(run))
    start = ckpt.restore_run(run, run_dir) if cfg.resume else 0
    if not cfg.resume and ctx.is_main:
        start_run_dir(run, run_dir)
    span = StepSpan.of(cfg, run.task.batches_per_epoch(), start)
    log = (StepLog(run_dir / "metrics.jsonl", resume_step=start if cfg.resume else None, report_to=cfg.report_to)
           if ctx.is_main else None)
    save = partial(ckpt.save_run, run, run_dir, started=started)
    result = train_steps(run, span, log, save)
    if span.stops_early:  # an interrupted (--stop-at) invocation: leave a checkpoint, not a summary
        return stop_early(run, span, log, save)
    return finish(run, run_dir, log, result, started)


def start_run_dir(run: Run, run_dir: Path) -> None:
    """A fresh run folder (an old one only goes now, with --overwrite) holding config.json and the task's files."""
    if run_dir.exists() and (run.cfg.overwrite or check_new_run_dir(run_dir)):
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
    ckpt.save_tensors_atomic(final_state, run_dir / "trainable.safetensors")  # no full copy (7B: 13 GB)
    method_artifacts = getattr(run.method, "save_artifacts", None)
    if method_artifacts and not run.fsdp:
        method_artifacts(run.model, run_dir, run.cfg)
    records = log.history()
    metrics = run_summary(run, final, final_state, records, result, started)
    plot_losses(records, run_dir / "loss.png", title=f"{run.cfg.method} + {run.cfg.optim} on {run.cfg.data}")
    write_summary(run_dir / "metrics.json", metrics)
    return metrics


class _CallableModule(types.ModuleType):
    """``leantrain.train`` names both the API function and this module, and importing the module rebinds the
    package attribute to it: calling the module calls ``train``, so ``leantrain.train(cfg)`` works every time."""

    def __call__(self, cfg: TrainConfig, verbose: bool = True) -> dict[str, Any]:
        return train(cfg, verbose)


sys.modules[__name__].__class__ = _CallableModule
