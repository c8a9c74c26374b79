"""Assemble a training run: the one place a task, its shaped model, the param groups and the optimizer meet.

``leantrain train``, the memory measurement (``memory/measuring.py``) and the benchmarks build their runs here, so
the order that decides results cannot drift between them:

    seed -> task (data + model init) -> --dtype cast -> quantized base -> method.apply -> LoftQ -> head group
         (its lr rule) -> DDP/FSDP wrap -> optimizer (+ bf16 compensation, + the method's wrapper)
         -> --layerwise hooks (the step inside backward) -> --galore-in-backward (projecting Linear backwards)

Every step draws from the global RNG in this order, which is what makes a run reproducible from its config.
Pieces that a special-purpose setup needs on its own (``calibration``, ``head_group``, ``base_lr``,
``build_optimizer_for``) are public so it shares them instead of copying them.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from . import allocator, dist, galore_backward, preflight
from .config import TrainConfig
from .data import prefetch_data
from .layerwise import LayerwiseStep
from .methods import Calibration, Method, get_method, head_module
from .mixed import autocast_calls, new_scaler
from .models import enable_activation_checkpointing
from .optim.registry import build_optimizer
from .precision import cast_model, wrap_for_dtype

CALIBRATION_BATCHES = 4  # training batches a data-dependent init (SHiRA gradient/SNIP masks) may look at
HEAD_MIN_LR = 1e-3  # a fresh head learns from scratch: it never trains slower than this unless --head-lr says so


class Task(Protocol):
    """What assembling and stepping a run need from a task: a model, batches and a loss.

    ``leantrain train``'s tasks (``classify.py``, ``lm/task.py``) also answer ``evaluate``, ``write_run_files``,
    ``save_artifacts`` and ``summary``; the memory measurement's random-batch task does not need to."""

    model: nn.Module
    forward_model: nn.Module  # what the loss calls: the model, or its DDP wrapper

    def batches_per_epoch(self) -> int: ...

    def batch(self, index: int) -> dict[str, torch.Tensor]: ...

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class Run:
    """A fully assembled run: everything the loop, the checkpoints and the summary read."""

    cfg: TrainConfig
    task: Task
    method: Method
    optimizer: torch.optim.Optimizer
    ctx: dist.DistContext = field(default_factory=dist.DistContext)
    layerwise: LayerwiseStep | None = None  # --layerwise: the hooks that step inside backward
    memory_plan: dict[str, Any] = field(default_factory=dict)  # pre-flight estimate (preflight.plan)
    scaler: torch.amp.GradScaler | None = None  # fp16 mixed precision's loss scaler (leantrain/mixed.py)

    @property
    def model(self) -> nn.Module:
        """The unwrapped model (DDP's wrapper lives in ``task.forward_model``)."""
        return self.task.model

    @property
    def fsdp(self) -> bool:
        """Parameters are DTensor shards: checkpoints and counts must gather or count locally."""
        return self.ctx.enabled and self.ctx.strategy == "fsdp"

    @property
    def manual_sync(self) -> bool:
        """Gradients are averaged by hand, because the method's parameters are not wrapped in DDP."""
        return self.ctx.enabled and changes_parameter_shapes(self.method)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that train right now; call again each step, since DLRT swaps parameters when a rank changes."""
    return [p for p in model.parameters() if p.requires_grad]


def changes_parameter_shapes(method: Any) -> bool:
    """A method declaring ``changes_parameter_shapes = True`` (DLRT) cannot be wrapped by DDP or sharded by FSDP."""
    return bool(getattr(method, "changes_parameter_shapes", False))


def build_task(cfg: TrainConfig, device: torch.device) -> Task:
    """The task object owns data + model and answers batch/loss/evaluate (see leantrain/classify.py)."""
    if cfg.task == "causal-lm":
        from .lm.task import CausalLMTask

        return CausalLMTask(cfg, device)
    from .classify import ClassificationTask

    return ClassificationTask(cfg, device)


def calibration(task: Task) -> Calibration:
    """The first training batches' losses, for methods whose init looks at data (SHiRA's gradient masks)."""
    def losses(_model: nn.Module) -> Iterator[torch.Tensor]:
        for i in range(CALIBRATION_BATCHES):
            yield task.loss(task.batch(i))

    return losses


def base_lr(cfg: TrainConfig, method: Method) -> float:
    """--lr, or the method's default: adapters and full fine-tuning want learning rates orders of magnitude apart."""
    return cfg.lr if cfg.lr is not None else method.default_lr


def attention_config(model: nn.Module) -> Any:
    """The first (sub)module config with attention heads -- leantrain's classifier wraps the HF encoder -- or None."""
    for module in model.modules():
        conf = getattr(module, "config", None)
        if getattr(conf, "num_attention_heads", None):
            return conf
    return None


def name_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Each group with its parameters' ``names`` (parallel to ``params``) and the model's attention ``head_dim``
    (None without an attention config): optimizers whose rule depends on a parameter's role read them (Adam-mini's
    per-head blocks for query / key), the others ignore them."""
    names = {id(p): n for n, p in model.named_parameters()}
    conf = attention_config(model)
    head_dim = None if conf is None else getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    return [{**g, "names": [names.get(id(p), "") for p in g["params"]], "head_dim": head_dim} for g in groups]


def head_group(model: nn.Module, cfg: TrainConfig, lr: float) -> dict | None:
    """The task head's param group (every method trains it), or None for a model without a head.

    Its lr is --head-lr, else ``max(lr, 1e-3)``: a freshly initialised head at an adapter's small lr barely moves.
    """
    head = head_module(model)
    if head is None:
        return None
    for p in head.parameters():
        p.requires_grad_(True)
    return {"params": list(head.parameters()), "name": "head", "lr": cfg.head_lr or max(lr, HEAD_MIN_LR)}


def shape_model(model: nn.Module, cfg: TrainConfig, method: Method, calib: Calibration | None) -> list[dict]:
    """Quantize the frozen base, apply the method, then LoftQ; returns the method's param groups.

    LoftQ quantizes *after* the adapter exists, so the quantized base Q and the adapter BA approximate W jointly;
    the method therefore sees ``init="default"`` and the base stays in full precision until then.
    """
    from .quant import quantize, quantized_layers, quantizes_before_method
    from .quant.convert import BITS

    loftq = cfg.init == "loftq"
    # a scratch model was quantized while it was built (lm.task), with the same targets
    if quantizes_before_method(cfg.quantize, cfg.init) and not quantized_layers(model):
        quantize(model, bits=BITS[cfg.quantize], targets=cfg.targets)
    groups = method.apply(model, replace(cfg, init="default") if loftq else cfg, calib)
    if loftq:
        from .quant import apply_loftq

        apply_loftq(model, "default", bits=BITS[cfg.quantize])
    return groups


def refuse_unsupported_strategy(cfg: TrainConfig, method: Method, ctx: dist.DistContext) -> None:
    """FSDP shards parameters at wrap time, so a method that resizes them mid-run cannot use it."""
    if ctx.enabled and ctx.strategy == "fsdp" and changes_parameter_shapes(method):
        raise ValueError(f"--method {cfg.method} changes parameter shapes during training and cannot run under "
                         "--strategy fsdp; use --strategy ddp")


def wrap_for_distributed(task: Task, groups: list[dict], ctx: dist.DistContext,
                         bucket_view: bool = False) -> list[dict]:
    """Wrap the task's model for DDP/FSDP2 and re-point the param groups at the (possibly new) parameters
    (``bucket_view``: DDP's gradients are views of its buckets, as --layerwise wants)."""
    model = task.model
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    task.forward_model = dist.wrap_model(model, ctx, bucket_view)
    current = dict(model.named_parameters())
    return [{**g, "params": [current[n] for n in ns]} for g, ns in zip(groups, group_names)]


def build_optimizer_for(cfg: TrainConfig, groups: list[dict], lr: float, method: Method | None = None,
                        model: nn.Module | None = None) -> torch.optim.Optimizer:
    """--optim over ``groups``, compensated for bf16 weights (``--bf16-update``), then wrapped by the method if
    it integrates in several passes (DLRT's KLS drives the compensated optimizer as its inner one).

    Every group remembers its ``initial_lr``: the schedule scales that, so it is a pure function of the step.
    """
    if cfg.state_dtype != "fp32":  # --state-dtype bf16: every group's plain moments in that codec
        groups = [{**g, "codec": g.get("codec") or cfg.state_dtype} for g in groups]
    optimizer = wrap_for_dtype(build_optimizer(cfg.optim, groups, cfg, lr), cfg.weight_dtype, cfg.bf16_update, cfg.seed)
    wrap = getattr(method, "wrap_optimizer", None)
    if wrap is not None:
        optimizer = wrap(optimizer, model, cfg)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def new_task(cfg: TrainConfig, ctx: dist.DistContext) -> Task:
    """Download the data once (rank 0), seed, then build the task, whose model init draws from that seed."""
    if ctx.enabled:
        dist.on_main(ctx, lambda: prefetch_data(cfg))  # one download, not one per process
    torch.manual_seed(cfg.seed)
    return build_task(cfg, ctx.device)


def layerwise_hooks(cfg: TrainConfig, task: Task, optimizer: torch.optim.Optimizer,
                    ctx: dist.DistContext) -> LayerwiseStep | None:
    """--layerwise: hook the optimizer step into backward, after the gradient sync under torchrun (DDP: a
    communication hook on the wrapper in ``task.forward_model``; FSDP2: hooks on the sharded parameters)."""
    if not cfg.layerwise:
        return None
    strategy = ctx.strategy if ctx.enabled else "none"
    hooks = LayerwiseStep(optimizer, task.model, cfg.grad_clip, cfg.nan_policy, strategy=strategy, world=ctx.world)
    return hooks.register(ddp=getattr(task, "forward_model", None) if strategy == "ddp" else None,
                          grad_accum=cfg.grad_accum)


def build_run(cfg: TrainConfig, ctx: dist.DistContext | None = None, task: Task | None = None) -> Run:
    """Assemble the run ``cfg`` describes; ``task`` replaces the data-backed one (memory measurement)."""
    ctx = ctx or dist.DistContext()
    if cfg.galore_in_backward and ctx.enabled:
        raise ValueError("--galore-in-backward runs on one process, not under torchrun (DDP/FSDP2 would sync "
                         "and shard the full gradients it never builds)")
    if cfg.return_freed_memory:  # before the model exists: its blocks are then mapped one by one
        allocator.return_freed_memory()
    method = get_method(cfg.method)
    memory_plan = preflight.plan(cfg, str(ctx.device)) if task is None else {}  # before anything big exists
    task = task if task is not None else new_task(cfg, ctx)
    memory_plan.update(exact_estimate(cfg, task, ctx, memory_plan.get("estimated_peak_bytes")))
    cast_model(task.model, cfg.weight_dtype)  # a no-op where the task built the model in the dtype
    autocast_calls(task, cfg, ctx.device)  # --master-weights fp32: mixed precision
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(task.model)
    groups = shape_model(task.model, cfg, method, calibration(task))
    lr = base_lr(cfg, method)
    head = head_group(task.model, cfg, lr)
    if head is not None:
        groups.append(head)
    groups = name_groups(task.model, groups)
    refuse_unsupported_strategy(cfg, method, ctx)
    if ctx.enabled and not changes_parameter_shapes(method):  # shape-changing methods sync gradients by hand
        groups = wrap_for_distributed(task, groups, ctx, bucket_view=cfg.layerwise)
    optimizer = build_optimizer_for(cfg, groups, lr, method, task.model)
    hooks = layerwise_hooks(cfg, task, optimizer, ctx)
    if cfg.galore_in_backward:  # the run's Linears hand the optimizer low-rank gradients (galore_backward.py)
        galore_backward.install(task.model, optimizer, on_ready=None if hooks is None else hooks.step_supplied)
    return Run(cfg, task, method, optimizer, ctx, hooks, memory_plan, new_scaler(cfg, ctx.device))


def exact_estimate(cfg: TrainConfig, task: Task, ctx: dist.DistContext, before: int | None) -> dict[str, Any]:
    """A scratch LM's estimate with its corpus vocabulary (the pre-flight used GaLore's 32000, an upper bound)."""
    if cfg.init_weights != "scratch" or before is None:
        return {}
    try:
        vocab = int(task.model.config.vocab_size)
        exact = preflight.predicted_bytes(cfg, str(ctx.device), vocab_size=vocab)
        return {"estimated_peak_bytes": exact, "preflight_peak_bytes": before}
    except (ValueError, KeyError, AttributeError):
        return {}
