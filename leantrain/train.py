"""The training loop of ``leantrain train``, top to bottom.

config -> data -> model (+ optional quantized base) -> method.apply -> optimizer (+ method's wrapper) -> loop:
closure(zero_grad, forward, backward, clip, finite check) -> optimizer.step(closure) -> log -> eval -> checkpoint.

``optimizer.step(closure)`` is used for every optimizer so that integrators which need several forward/backward
passes per step (DLRT's KLS) fit the same loop. The learning-rate schedule (linear warm-up, linear decay) is a
pure function of the step, and batches are a pure function of (seed, step), so resuming needs only the
checkpointed tensors and RNG state to continue exactly.
"""
from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import dist
from .config import TrainConfig
from .dist_utils import average_gradients, local_bytes, optimizer_state_bytes_local
from .methods import default_trainable_state, get_method, head_module
from .optim.registry import build_optimizer
from .report import StepLog, plot_losses, read_jsonl, write_summary

# Fields that may differ between the original run and a --resume invocation.
PER_INVOCATION = {"resume", "stop_at", "progress", "overwrite"}
RUNTIME_FIELDS = {"resume", "stop_at", "progress", "save_every", "eval_every", "steps", "overwrite", "device",
                  "strategy"}
CALIBRATION_BATCHES = 4


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over ``warmup_ratio`` of the run, then linear decay to zero (step is 0-based)."""
    warmup = int(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * batches_per_epoch / cfg.grad_accum))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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


def build_task(cfg: TrainConfig, device: torch.device):
    """The task object owns data + model and answers batch/loss/evaluate (see leantrain/classify.py)."""
    if cfg.task == "causal-lm":
        from .lm.task import CausalLMTask

        return CausalLMTask(cfg, device)
    from .classify import ClassificationTask

    return ClassificationTask(cfg, device)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; under torchrun every process calls this and rank 0 writes the outputs."""
    ctx = dist.init_from_env(cfg.device, cfg.strategy)
    try:
        return _train(cfg, ctx)
    finally:
        dist.shutdown(ctx)


def _train(cfg: TrainConfig, ctx: dist.DistContext) -> dict[str, Any]:
    started = time.time()
    main = ctx.is_main
    # 1. Validate everything that can fail before the run folder is touched.
    run_dir, cfg = dist.on_main(ctx, lambda: prepare_run_dir(cfg))
    method = get_method(cfg.method)
    device = ctx.device
    if ctx.enabled:
        dist.on_main(ctx, lambda: _prefetch(cfg))  # one download, not one per process
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, device)
    model = task.model

    def calib(m: torch.nn.Module):
        for i in range(CALIBRATION_BATCHES):
            yield task.loss(task.batch(i))

    # 2. Shape the model: optional quantized frozen base, then the method, then DDP/FSDP.
    loftq = cfg.init == "loftq"
    if cfg.quantize:
        from .quant import quantize

        bits = {"nf4": 4, "int8": 8}[cfg.quantize]
        if not loftq:  # LoftQ quantizes after the adapter exists, so Q + BA can approximate W jointly
            quantize(model, bits=bits, targets=cfg.targets)
    groups = method.apply(model, replace(cfg, init="default") if loftq else cfg, calib)
    if loftq:
        from .quant import apply_loftq

        apply_loftq(model, "default", bits=bits)
    head = head_module(model)
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(head.parameters()), "name": "head", "lr": cfg.head_lr or max(lr, 1e-3)})
    # Multi-pass integrators (DLRT's KLS: several backward passes per step, parameters that change shape) are not
    # wrapped in DDP; the closure averages their gradients by hand instead.
    manual_sync = ctx.enabled and hasattr(method, "wrap_optimizer")
    if manual_sync and ctx.strategy == "fsdp":
        raise ValueError(f"--method {cfg.method} changes parameter shapes during training and cannot run under "
                         "--strategy fsdp; use --strategy ddp")
    if ctx.enabled and not manual_sync:
        groups = _wrap_for_distributed(task, groups, ctx)
    optimizer = build_optimizer(cfg.optim, groups, cfg, lr)
    if hasattr(method, "wrap_optimizer"):
        optimizer = method.wrap_optimizer(optimizer, model, cfg)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    steps_total = total_steps(cfg, task.batches_per_epoch())
    steps_end = min(steps_total, cfg.stop_at or steps_total)
    fsdp = ctx.enabled and ctx.strategy == "fsdp"
    if fsdp and (cfg.save_every or cfg.stop_at or cfg.resume) and _rank_local_state(optimizer):
        raise ValueError(f"--strategy fsdp with --optim {cfg.optim}: its block-wise state is rank-local and cannot "
                         "be saved as a full-state checkpoint yet; use --strategy ddp or drop --save-every/--stop-at")

    def trainable_state() -> dict[str, torch.Tensor]:
        hook = getattr(method, "trainable_state", None)
        state = hook(model) if hook else default_trainable_state(model)
        # FSDP: gathered on every rank, and copied at once -- FSDP frees unsharded storage behind our back.
        return {k: dist.full_tensor(v).detach().clone() if fsdp else v for k, v in state.items()}

    def optimizer_state() -> dict:
        if not fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))

    # 3. Fresh run or resume.
    start_step = 0
    if cfg.resume:
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint (was --save-every set?)")
        try:
            model_state, opt_state, trainer, rng = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as exc:
            prev = ckpt.previous_checkpoint(path)
            hint = f"; the previous checkpoint {prev} is intact: delete {path.name} to resume from it" if prev else ""
            raise ckpt.CheckpointError(f"{exc}{hint}") from exc
        if hasattr(method, "load_trainable_state"):
            method.load_trainable_state(model, model_state)
        else:
            _load_trainable(model, model_state)
        if trainer.get("optimizer_format", "index") == "fqn" or fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(opt_state)
        _set_rng_state(rng)
        start_step = trainer["step"]
    elif main:
        if cfg.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")
        task.write_run_files(run_dir)
    log = StepLog(run_dir / "metrics.jsonl", resume_step=start_step if cfg.resume else None) if main else None
    def trainable_now() -> list[torch.nn.Parameter]:
        # Recomputed each step: DLRT replaces parameters when a layer's rank changes.
        return [p for p in model.parameters() if p.requires_grad]

    def save(step: int) -> None:
        model_state, opt_state = trainable_state(), optimizer_state()  # collectives under FSDP: every rank
        if main:
            ckpt.save_checkpoint(run_dir, step, model_state, opt_state,
                                 {"wall_time": time.time() - started, "world_size": ctx.world,
                                  "optimizer_format": "fqn" if fsdp else "index"}, _rng_state())
        if ctx.enabled:
            torch.distributed.barrier()

    # 4. The loop.
    skipped = 0
    state = {"step": start_step}

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = dist.shard_batch(task.batch(state["step"] * cfg.grad_accum + micro), ctx)
            loss = task.loss(batch) / cfg.grad_accum
            loss.backward()
            total += loss.detach()
        if manual_sync:
            average_gradients(model.parameters(), ctx.world)
        total = dist.mean_across(total, ctx)  # the global-batch loss, identical on every rank
        trainable = trainable_now()
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))
        norm = dist.full_tensor(norm)
        if not (torch.isfinite(total) and torch.isfinite(norm)):
            names = {id(p): n for n, p in model.named_parameters()}
            bad = next((names.get(id(p), "?") for p in trainable
                        if p.grad is not None and not torch.isfinite(dist.full_tensor(p.grad)).all()), "the loss")
            if cfg.nan_policy == "stop":
                raise FloatingPointError(f"step {state['step'] + 1}: non-finite loss or gradient (first in {bad}); "
                                         "rerun with --nan-policy skip to skip such steps")
            optimizer.zero_grad(set_to_none=True)
        return total

    model.train()
    bar = tqdm(total=steps_end, initial=start_step, disable=not (cfg.progress and main),
               desc=f"{cfg.method}/{cfg.optim}", unit="step", dynamic_ncols=True)
    ema, tick = None, time.time()
    loop_started, eval_time = time.time(), 0.0
    metrics_hook = getattr(method, "metrics", None)
    for step in range(start_step, steps_end):
        state["step"] = step
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, steps_total, cfg.warmup_ratio)
        loss = optimizer.step(closure)
        value = float(loss)
        if not math.isfinite(value):
            skipped += 1
        record: dict[str, Any] = {"step": step + 1, "loss": value, "lr": optimizer.param_groups[0]["lr"]}
        if metrics_hook:
            record.update(metrics_hook(model))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps_end:
            eval_started = time.time()
            record.update({f"val_{k}": v for k, v in task.evaluate().items()})
            eval_time += time.time() - eval_started
        if log:
            log.write(record)
        if math.isfinite(value):
            ema = value if ema is None else 0.95 * ema + 0.05 * value
        now = time.time()
        bar.set_postfix(loss=f"{ema:.4f}" if ema is not None else "nan",
                        ex_s=f"{cfg.batch_size * cfg.grad_accum / max(now - tick, 1e-9):.1f}")
        tick = now
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
    bar.close()
    train_time = time.time() - loop_started - eval_time

    if steps_end < steps_total:  # an interrupted (--stop-at) invocation: leave a checkpoint, not a summary
        if not (cfg.save_every and steps_end % cfg.save_every == 0):
            save(steps_end)
        if log:
            log.close()
        return {"step": steps_end, "stopped_early": True, "rank": ctx.rank}

    # 5. Final evaluation, artifacts and summary (metrics.json marks the run complete).
    final_state = trainable_state()
    final = {f"val_{k}": v for k, v in task.evaluate().items()}
    task.save_artifacts(run_dir, write=main)
    if not main:
        return {"step": steps_end, "rank": ctx.rank, **final}
    log.write({"step": steps_end, **final})
    log.close()
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in final_state.items()},
              str(run_dir / "trainable.safetensors"))
    if hasattr(method, "save_artifacts") and not fsdp:
        method.save_artifacts(model, run_dir, cfg)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if "loss" in r and math.isfinite(r["loss"])]
    trainable_final = trainable_now()
    metrics = {
        "method": cfg.method,
        "optim": cfg.optim,
        **final,
        **task.summary(),
        "train_loss_last": sum(train_losses[-20:]) / max(1, len(train_losses[-20:])) if train_losses else None,
        "steps": steps_end,
        "skipped_steps": skipped,
        "wall_time_s": time.time() - started,
        "sec_per_step": train_time / max(1, steps_end - start_step),  # loop only, this invocation
        "trainable_params": sum(p.numel() for p in final_state.values() if p.is_floating_point())
        if fsdp else sum(p.numel() for p in trainable_final),
        "total_params": sum(p.numel() for p in model.parameters()),
        # per process: DTensor.numel() is the global count, so FSDP shards are counted with to_local()
        "param_bytes": local_bytes(model.parameters()) + local_bytes(model.buffers()),
        "grad_bytes": local_bytes(trainable_final),
        "optimizer_state_bytes": optimizer_state_bytes_local(optimizer),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": str(device),
        "world_size": ctx.world,
        "strategy": ctx.strategy,
    }
    if metrics_hook:
        metrics.update(metrics_hook(model))
    plot_losses(records, run_dir / "loss.png", title=f"{cfg.method} + {cfg.optim} on {cfg.data}")
    write_summary(run_dir / "metrics.json", metrics)
    return metrics


def _rank_local_state(optimizer) -> bool:
    """leantrain's block optimizers keep plain rank-local state tensors under FSDP2 (DCP cannot re-shard them)."""
    from .optim.adam import BlockOptimizer

    inner = getattr(optimizer, "inner", optimizer)  # DLRT's KLS wrapper holds the real optimizer in .inner
    return isinstance(inner, BlockOptimizer)


def _prefetch(cfg: TrainConfig) -> None:
    """Fetch a bundled data set once (on rank 0) before every process reads it from the cache."""
    if cfg.data in ("vader", "bible"):
        from .sources import load_source

        load_source(cfg.data)


def _wrap_for_distributed(task, groups: list[dict], ctx: dist.DistContext) -> list[dict]:
    """Wrap the task's model for DDP/FSDP2 and re-point the param groups at the (possibly new) parameters."""
    model = task.model
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    task.forward_model = dist.wrap_model(model, ctx)
    current = dict(model.named_parameters())
    return [{**g, "params": [current[n] for n in ns]} for g, ns in zip(groups, group_names)]


def _load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed tensors into the model, checking names and shapes first (nothing changes on error)."""
    current = dict(model.named_parameters())
    current.update(dict(model.named_buffers()))
    for key, value in state.items():
        if key not in current:
            raise ckpt.CheckpointError(f"checkpoint tensor {key!r} does not exist in the model")
        if tuple(current[key].shape) != tuple(value.shape):
            raise ckpt.CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, "
                                       f"model expects {tuple(current[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            current[key].copy_(value)
