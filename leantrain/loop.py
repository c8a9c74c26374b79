"""The training loop: a stateless schedule, one closure per step, and hooks for logging, evaluation and saving.

``optimizer.step(closure)`` is used for every optimizer so that integrators which need several forward/backward
passes per step (DLRT's KLS) fit the same loop; gradient accumulation, the gradient sync of such methods under
torchrun, clipping and the non-finite policy therefore live in the closure, in one place. The learning rate is a
pure function of the step and batches are a pure function of (seed, step), so a resumed loop needs only the
checkpointed tensors and RNG state to continue exactly.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from tqdm.auto import tqdm

from . import dist
from .config import TrainConfig
from .dist_utils import average_gradients
from .layerwise import LayerwiseStep
from .mixed import unscale_and_check
from .report import StepLog
from .run import Run, Task, trainable_parameters

EMA_KEEP, EMA_NEW = 0.95, 0.05  # smoothing of the loss shown on the progress bar
PROGRESS_EVERY_S = 2.0  # how often a long --layerwise backward refreshes the bar


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio`` of the run, then linear decay to zero (step is 0-based)."""
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """--steps, else --epochs (default 1) worth of optimizer steps (each consuming --grad-accum batches)."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * batches_per_epoch / cfg.grad_accum))


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, total: int, warmup_ratio: float) -> None:
    """Every group's lr for ``step``, from its ``initial_lr`` (nothing carried over from the previous step)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(step, total, warmup_ratio)


@dataclass
class Closure:
    """What ``optimizer.step`` calls for step ``step``: one global batch's loss with its gradients.

    zero grads -> forward/backward over --grad-accum micro-batches (this rank's shard of each) -> hand-made
    gradient sync for shape-changing methods -> clip -> non-finite check under --nan-policy. Returns the
    global-batch loss, identical on every rank.
    """

    task: Task
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    ctx: dist.DistContext = field(default_factory=dist.DistContext)
    manual_sync: bool = False
    step: int = 0
    layerwise: LayerwiseStep | None = None  # --layerwise: backward steps the optimizer (leantrain/layerwise.py)
    scaler: torch.amp.GradScaler | None = None  # fp16 mixed precision (leantrain/mixed.py)
    overflowed: bool = False  # the last call's scaled gradients overflowed: no update, the scale backs off

    @classmethod
    def for_run(cls, run: Run) -> Closure:
        """The closure of ``leantrain train``: gradients synced by hand when the run's method needs it."""
        return cls(run.task, run.optimizer, run.cfg, run.ctx, run.manual_sync, layerwise=run.layerwise,
                   scaler=run.scaler)

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.layerwise is not None:
            return self._layerwise()
        total = self._accumulate()
        if self.manual_sync:
            average_gradients(self.task.model.parameters(), self.ctx.world)
        total = dist.mean_across(total, self.ctx)
        self.overflowed = self.scaler is not None and unscale_and_check(self.scaler, self.optimizer)
        if self.overflowed:
            self.optimizer.zero_grad(set_to_none=True)
            return total
        trainable = trainable_parameters(self.task.model)
        norm = self._clip(trainable)
        if not (torch.isfinite(total) and torch.isfinite(norm)):
            self._non_finite(trainable)
        return total

    def _clip(self, trainable: list[torch.nn.Parameter]) -> torch.Tensor:
        """The global gradient norm (the finite check needs it even without --grad-clip), clipped to --grad-clip."""
        norm = get_total_norm([p.grad for p in trainable if p.grad is not None])
        if self.cfg.grad_clip:
            clip_grads_with_norm_(trainable, self.cfg.grad_clip, norm)
        return dist.full_tensor(norm)

    def _layerwise(self) -> torch.Tensor:
        """--layerwise: the hooks clip, check and step each parameter during backward (with --grad-accum, during the
        last micro-batch's backward). A non-finite loss is caught before its backward, like the ordinary step's
        check; under torchrun the global mean loss decides, so every rank takes the same branch (skip still runs
        backward, for DDP's and FSDP2's collectives, with no update)."""
        accum = self.cfg.grad_accum
        total = torch.zeros((), device=self.ctx.device)
        self.layerwise.start_step(self.step)
        for micro in range(accum):
            batch = dist.shard_batch(self.task.batch(self.step * accum + micro), self.ctx)
            loss = self.task.loss(batch) / accum
            mean = dist.mean_across(loss, self.ctx).detach()
            total += mean
            finite = bool(torch.isfinite(mean))
            if not finite and self.cfg.nan_policy == "stop":
                raise FloatingPointError(f"step {self.step + 1}: non-finite loss; rerun with --nan-policy skip to "
                                         "skip such steps")
            self.layerwise.start_micro(micro, accum, discard=not finite)
            if not finite and not self.ctx.enabled:
                return total
            loss.backward()
        self.layerwise.finish()
        return total

    def _accumulate(self) -> torch.Tensor:
        """Sum of the micro-batch losses, each scaled by 1/grad_accum so the gradient is the global mean."""
        accum = self.cfg.grad_accum
        total = torch.zeros((), device=self.ctx.device)
        for micro in range(accum):
            batch = dist.shard_batch(self.task.batch(self.step * accum + micro), self.ctx)
            loss = self.task.loss(batch) / accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        return total

    def _non_finite(self, trainable: list[torch.nn.Parameter]) -> None:
        """--nan-policy stop: raise naming the first bad parameter; skip: drop the gradients (no update)."""
        names = {id(p): n for n, p in self.task.model.named_parameters()}
        # every rank walks the same parameters: full_tensor is a collective under FSDP
        bad = next((names.get(id(p), "?") for p in trainable
                    if p.grad is not None and not torch.isfinite(dist.full_tensor(p.grad)).all()), "the loss")
        if self.cfg.nan_policy == "stop":
            raise FloatingPointError(f"step {self.step + 1}: non-finite loss or gradient (first in {bad}); "
                                     "rerun with --nan-policy skip to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class StepSpan:
    """The steps this invocation runs: [start, end) out of the run's ``total`` (end < total with --stop-at)."""

    start: int
    end: int
    total: int

    @classmethod
    def of(cls, cfg: TrainConfig, batches_per_epoch: int, start: int) -> StepSpan:
        total = total_steps(cfg, batches_per_epoch)
        return cls(start, min(total, cfg.stop_at or total), total)

    @property
    def stops_early(self) -> bool:
        return self.end < self.total


class Progress:
    """The tqdm bar (rank 0 with --progress): smoothed loss and examples per second."""

    def __init__(self, run: Run, span: StepSpan):
        cfg = run.cfg
        self.examples_per_step = cfg.batch_size * cfg.grad_accum
        self.bar = tqdm(total=span.end, initial=span.start, disable=not (cfg.progress and run.ctx.is_main),
                        desc=f"{cfg.method}/{cfg.optim}", unit="step", dynamic_ncols=True)
        self.ema: float | None = None
        self.tick = self.shown = time.time()
        if run.layerwise is not None and not self.bar.disable:
            run.layerwise.on_update = self.inside_step

    def inside_step(self, done: int, total: int) -> None:
        """--layerwise: parameters stepped so far in this backward (a 7B step with projector refreshes is long)."""
        now = time.time()
        if now - self.shown >= PROGRESS_EVERY_S or done == total:
            self.bar.set_postfix_str(f"updated {done}/{total} tensors", refresh=True)
            self.shown = now

    def advance(self, loss: float) -> None:
        if math.isfinite(loss):
            self.ema = loss if self.ema is None else EMA_KEEP * self.ema + EMA_NEW * loss
        now = time.time()
        self.bar.set_postfix(loss=f"{self.ema:.4f}" if self.ema is not None else "nan",
                             ex_s=f"{self.examples_per_step / max(now - self.tick, 1e-9):.1f}")
        self.tick = now
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class LoopResult:
    """What the summary needs from the loop."""

    span: StepSpan
    skipped: int  # steps whose loss or gradient was not finite (--nan-policy skip)
    train_time: float  # seconds in the loop, evaluation excluded


def evaluate_if_due(run: Run, step: int, span: StepSpan, record: dict[str, Any]) -> float:
    """--eval-every: add ``val_*`` to the step's record (the final evaluation is the summary's); returns seconds."""
    every = run.cfg.eval_every
    if not (every and (step + 1) % every == 0 and step + 1 < span.end):
        return 0.0
    started = time.time()
    record.update({f"val_{k}": v for k, v in run.task.evaluate().items()})
    return time.time() - started


def train_steps(run: Run, span: StepSpan, log: StepLog | None, save: Callable[[int], None]) -> LoopResult:
    """Run steps ``span.start .. span.end - 1``: log each, evaluate and checkpoint when due."""
    cfg, optimizer = run.cfg, run.optimizer
    closure = Closure.for_run(run)
    method_metrics = getattr(run.method, "metrics", None)
    run.model.train()
    progress = Progress(run, span)
    started, eval_time, skipped = time.time(), 0.0, 0
    for step in range(span.start, span.end):
        closure.step = step
        set_learning_rates(optimizer, step, span.total, cfg.warmup_ratio)
        value = float(closure() if run.layerwise is not None else optimizer.step(closure))
        if not math.isfinite(value) or closure.overflowed:  # --nan-policy skip or an fp16 overflow: no update
            skipped += 1
        record: dict[str, Any] = {"step": step + 1, "loss": value, "lr": optimizer.param_groups[0]["lr"]}
        if run.scaler is not None:
            record.update(loss_scale=run.scaler.get_scale(), overflow=closure.overflowed)
            run.scaler.update()
        if method_metrics:
            record.update(method_metrics(run.model))
        eval_time += evaluate_if_due(run, step, span, record)
        if log:
            log.write(record)
        progress.advance(value)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
    progress.close()
    return LoopResult(span, skipped, time.time() - started - eval_time)


def stop_early(run: Run, span: StepSpan, log: StepLog | None, save: Callable[[int], None]) -> dict[str, Any]:
    """An interrupted (--stop-at) invocation leaves a checkpoint at its last step and no summary."""
    save_every = run.cfg.save_every
    if not (save_every and span.end % save_every == 0):  # else the loop has just saved it
        save(span.end)
    if log:
        log.close()
    return {"step": span.end, "stopped_early": True, "rank": run.ctx.rank}
