"""ReLoRA: LoRA merged into the base and restarted every N steps, so a sequence of low-rank updates adds up to a
high-rank one.

Paper: Lialin et al., *ReLoRA: High-Rank Training Through Low-Rank Updates*, 2023, https://arxiv.org/abs/2307.05695.
Every ``relora_every`` optimizer steps (a restart):

1. merge:  W <- W + (alpha / r) B A  for every targeted Linear (the function is unchanged);
2. re-initialise: A ~ U(-1/sqrt(in), 1/sqrt(in)) (LoRA's Kaiming init), B = 0 (the output is still unchanged);
3. prune the adapters' optimizer state: keep the ``1 - relora_prune`` largest-magnitude entries of every moment
   (paper: 99 % pruned). The entries kept are chosen once per parameter from its largest moment (Adam's second
   moment) so that no kept first moment meets a zeroed second moment (an m / (sqrt(v) + eps) blow-up); an
   optimizer whose state is not plain per-element floats (8-bit codes) has the adapters' state reset instead;
4. jagged schedule: the next ``relora_warmup`` steps scale every group's lr by (t + 1) / (warmup + 1), on top of
   the run's own schedule (the loop sets each step's lr from the step first; this scale is applied inside
   ``step``, so it needs no change to the loop).

Full-rank warm start (the paper trains the whole model for a few thousand steps before ReLoRA begins):
``relora_warm_start`` = N > 0 trains the targeted W themselves for the first N optimizer steps (the adapters are
frozen, B = 0 so they add nothing); after step N the W freeze, their optimizer state is dropped, the adapters start
training (a reset, so the jagged warm-up follows it too), and restarts come every ``relora_every`` steps after N.
Which phase a run is in is a function of the step counter alone, so a resume re-applies it.

As in the paper, the parameters outside the targeted Linears (embeddings, norms, biases, the LM head) train
fully; the targeted weights move only through the merges (and the warm start). Options come from
``TrainConfig.extra`` (``--extra relora_every=20``, or ``{"extra": {"relora_every": 20}}`` in a ``--config``
file): ``relora_every`` (default 200), ``relora_warmup`` (default every // 10), ``relora_prune`` (default 0.99),
``relora_warm_start`` (default 0). A is re-drawn from a generator seeded by (--seed, restart index), so restarts
never consume the global RNG and a resumed run repeats them exactly; the checkpoint holds the merged base weights
and the adapters (``trainable_state``) and the step counter (the optimizer state).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..methods import EstimatorTensor, default_trainable_state, head_parameter_names, register
from .base import add_to_base_weight
from .inject import adapter_layers
from .lora import LoraLinear
from .methods import ADAPTER_NAME, AdapterMethod, _lora

DEFAULT_EVERY, DEFAULT_PRUNE = 200, 0.99


@dataclass(frozen=True)
class ReloraOptions:
    """The restart period, the post-restart lr warm-up length, the pruned fraction of optimizer state and the
    number of full-rank steps before the first adapter step."""

    every: int = DEFAULT_EVERY
    warmup: int = DEFAULT_EVERY // 10
    prune: float = DEFAULT_PRUNE
    warm_start: int = 0

    @classmethod
    def of(cls, extra: dict[str, Any]) -> ReloraOptions:
        """Read ``relora_every`` / ``relora_warmup`` / ``relora_prune`` / ``relora_warm_start`` from
        TrainConfig.extra (checked)."""
        every = extra.get("relora_every", DEFAULT_EVERY)
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ValueError(f"TrainConfig.extra relora_every={every!r} must be a positive integer")
        warmup = extra.get("relora_warmup", every // 10)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup < every:
            raise ValueError(f"TrainConfig.extra relora_warmup={warmup!r} must be an integer in [0, {every})")
        prune = extra.get("relora_prune", DEFAULT_PRUNE)
        if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 <= prune <= 1:
            raise ValueError(f"TrainConfig.extra relora_prune={prune!r} must be a number in [0, 1]")
        warm = extra.get("relora_warm_start", 0)
        if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
            raise ValueError(f"TrainConfig.extra relora_warm_start={warm!r} must be an integer >= 0")
        return cls(every, warmup, float(prune), warm)


# ---- the restart (pure functions of the layers and the optimizer state) ------------------------------------------
def restart_generator(seed: int, restart: int) -> torch.Generator:
    """The generator of restart ``restart``: a function of (seed, restart) only, never of the global RNG."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + restart)


@torch.no_grad()
def merge_and_reinit(layer: LoraLinear, generator: torch.Generator) -> None:
    """W += scaling B A, then A ~ U(-1/sqrt(in), 1/sqrt(in)) and B = 0: the layer's function is unchanged."""
    p = layer.adapters[ADAPTER_NAME]
    add_to_base_weight(layer.base_layer, layer.delta_weight(ADAPTER_NAME))
    bound = 1.0 / math.sqrt(p.lora_A.shape[1])
    fresh = torch.empty(p.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    p.lora_A.copy_(fresh.to(p.lora_A))
    p.lora_B.zero_()


def prune_mask(state: dict[str, Any], p: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """True where an entry survives: the largest ``1 - fraction`` by magnitude of the largest per-element moment.
    None when the state holds per-element tensors that are not floats (quantized codes): reset it instead."""
    moments = [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape and v.ndim > 0]
    if not moments or not all(v.is_floating_point() for v in moments):
        return None
    ref = max(moments, key=lambda v: float(v.abs().sum()))  # Adam: exp_avg_sq dominates once |g| < 1
    keep = round((1.0 - fraction) * ref.numel())
    mask = torch.zeros(ref.numel(), dtype=torch.bool, device=ref.device)
    if keep > 0:
        mask[ref.abs().flatten().topk(keep).indices] = True
    return mask.view(ref.shape)


@torch.no_grad()
def prune_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], fraction: float) -> None:
    """Zero all but the kept entries of each parameter's moments (paper's magnitude pruning), or drop the
    parameter's state when it cannot be pruned element-wise (the optimizer re-initialises it lazily)."""
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        mask = prune_mask(state, p, fraction)
        if mask is None:
            optimizer.state.pop(p)
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.ndim > 0:
                value.mul_(mask)


def warmup_scale(step: int, opts: ReloraOptions) -> float:
    """Jagged schedule: lr factor of 0-based optimizer step ``step`` ((t + 1) / (warmup + 1) for the first
    ``warmup`` steps t after each restart and after the switch from the warm start, 1 elsewhere; the run's own
    warm-up covers the first adapter steps when there is no warm start)."""
    t = step - opts.warm_start
    if t < 0 or (t < opts.every and opts.warm_start == 0):
        return 1.0
    t %= opts.every
    return (t + 1) / (opts.warmup + 1) if t < opts.warmup else 1.0


# ---- the optimizer wrapper: restarts without a change to the loop ----------------------------------------------
class ReloraOptimizer(torch.optim.Optimizer):
    """Wraps the run's optimizer: ``step(closure)`` scales the lr (jagged schedule), runs the inner step, and
    every ``opts.every`` steps merges, re-initialises and prunes. Groups and state are the inner optimizer's."""

    def __init__(self, inner: torch.optim.Optimizer, model: nn.Module, opts: ReloraOptions, seed: int) -> None:
        self.inner, self.opts, self.seed, self.steps = inner, opts, seed, 0
        self.layers = [layer for _, layer in adapter_layers(model) if ADAPTER_NAME in layer.adapters]
        if not self.layers:
            raise ValueError("ReloraOptimizer: the model holds no LoRA adapter 'default'; apply --method relora first")
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.param_groups, self.state, self.defaults = inner.param_groups, inner.state, inner.defaults
        self._ready = True
        self.set_phase()

    def adapter_parameters(self) -> list[torch.Tensor]:
        return [p for layer in self.layers for p in layer.adapters[ADAPTER_NAME].parameters()]

    def base_weights(self) -> list[torch.Tensor]:
        return [layer.base_layer.weight for layer in self.layers]

    def warm(self) -> bool:
        """True while the targeted W train full-rank (the first ``warm_start`` steps)."""
        return self.steps < self.opts.warm_start

    def set_phase(self) -> None:
        """W trains during the warm start, the adapters after it (a function of the step counter only)."""
        warm = self.warm()
        for p in self.base_weights():
            p.requires_grad_(warm)
        for p in self.adapter_parameters():
            p.requires_grad_(not warm)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        scale = warmup_scale(self.steps, self.opts)
        if scale != 1.0:
            for group in self.param_groups:
                group["lr"] *= scale
        loss = self.inner.step(closure)
        self.steps += 1
        since = self.steps - self.opts.warm_start
        if since == 0 and self.opts.warm_start:
            self.switch()
        elif since > 0 and since % self.opts.every == 0:
            self.restart()
        return loss

    @torch.no_grad()
    def switch(self) -> None:
        """End of the warm start: freeze W (drop its gradient and optimizer state), start the adapters."""
        for p in self.base_weights():
            p.grad = None
            self.inner.state.pop(p, None)
        self.set_phase()

    def restart(self) -> None:
        """Merge every adapter into its base, re-draw A / zero B, prune the adapters' optimizer state."""
        generator = restart_generator(self.seed, (self.steps - self.opts.warm_start) // self.opts.every)
        for layer in self.layers:
            merge_and_reinit(layer, generator)
        prune_state(self.inner, self.adapter_parameters(), self.opts.prune)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """{"inner": the inner optimizer's state, "relora_steps": optimizer steps taken (restarts are derived)}."""
        return {"inner": self.inner.state_dict(), "relora_steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if "inner" not in state_dict or "relora_steps" not in state_dict:
            raise KeyError(f"ReloraOptimizer.load_state_dict: keys {sorted(state_dict)} lack 'inner'/'relora_steps'")
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        self.steps = int(state_dict["relora_steps"])
        self.set_phase()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            self.inner.add_param_group(param_group)
        else:
            super().add_param_group(param_group)


# ---- the method ----------------------------------------------------------------------------------------------
def _relora_tensors(module: str, out_f: int, in_f: int, opts: Any) -> list[EstimatorTensor]:
    """LoRA's A, B train; the targeted W stays frozen between merges (declared here as a frozen base tensor).
    With a warm start the peak is the warm phase: W trains (gradient and state) and the adapters wait frozen."""
    warm = ReloraOptions.of(getattr(opts, "extra", None) or {}).warm_start > 0
    return [EstimatorTensor(module + ".weight", (out_f, in_f), trains=warm, base=True),
            EstimatorTensor(module + ".lora_A", (opts.rank, in_f), trains=not warm),
            EstimatorTensor(module + ".lora_B", (out_f, opts.rank), trains=not warm)]


class ReloraMethod(AdapterMethod):
    """``--method relora``: LoRA on the targets plus every non-targeted parameter; restarts in the optimizer."""

    trains_base = True  # the targeted W change at each merge; everything else trains directly
    replaces_targets = True  # the estimator counts the frozen W with the method's tensors (see _relora_tensors)

    def trains_other(self, opts: Any) -> bool:
        return True

    def validate(self, cfg: TrainConfig) -> None:
        warm = ReloraOptions.of(cfg.extra).warm_start > 0
        restart_a = "ReLoRA re-draws a random A at each restart; use default or gaussian"
        in_step = "ReLoRA restarts inside optimizer.step, which --layerwise does not call"
        switch = ("the warm start changes which weights train mid-run, which DDP's fixed gradient buckets cannot "
                  "follow; drop --extra relora_warm_start or run one process")
        checks = [(cfg.init in ("default", "gaussian"), "init", cfg.init, restart_a),
                  (cfg.lora_plus_ratio is None, "lora_plus_ratio", cfg.lora_plus_ratio, "is not used by ReLoRA"),
                  (cfg.strategy != "fsdp", "strategy", cfg.strategy, "ReLoRA merges into whole weights; use ddp"),
                  (not getattr(cfg, "layerwise", False), "layerwise", True, in_step),
                  (not warm or cfg.strategy != "ddp", "strategy", cfg.strategy, switch)]
        for ok, name, value, why in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={value!r}: {why}")

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Any = None) -> list[dict]:
        groups = super().apply(model, cfg, calib)
        frozen = {id(layer.base_layer.weight) for _, layer in adapter_layers(model)}
        held = {id(p) for g in groups for p in g["params"]}
        head = head_parameter_names(model)
        other = [p for n, p in model.named_parameters() if id(p) not in frozen | held and n not in head]
        for p in other:
            p.requires_grad_(True)
        if ReloraOptions.of(cfg.extra).warm_start:  # W trains until the switch (ReloraOptimizer.set_phase)
            groups = [*groups, {"params": [layer.base_layer.weight for _, layer in adapter_layers(model)],
                                "name": "relora_full"}]
        return [*groups, {"params": other, "name": "other"}] if other else groups

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, cfg: TrainConfig) -> ReloraOptimizer:
        opts = ReloraOptions.of(cfg.extra)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if opts.warm_start and distributed and torch.distributed.get_world_size() > 1:  # --strategy auto = DDP
            raise ValueError(f"TrainConfig.extra relora_warm_start={opts.warm_start}: the warm start changes which "
                             "weights train mid-run, which DDP's fixed gradient buckets cannot follow; run one process")
        return ReloraOptimizer(optimizer, model, opts, cfg.seed)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable parameters, buffers, the targeted base weights (which the merges and the warm start change)
        and the adapters (frozen during the warm start, so not among the trainable parameters then)."""
        state = default_trainable_state(model)
        for name, layer in adapter_layers(model):
            state[f"{name}.base_layer.weight"] = layer.base_layer.weight.detach()
            for key, p in layer.adapters.named_parameters():
                state[f"{name}.adapters.{key}"] = p.detach()
        return state

    def save_artifacts(self, model: nn.Module, run_dir: str | Path, cfg: TrainConfig) -> None:
        """No PEFT files: the adapter is relative to a base that moved at every merge; the merged weights are in
        RUN/trainable.safetensors."""


RELORA = register(ReloraMethod("relora", _lora(), "ReLoRA: LoRA merged into the base and restarted every N steps "
                               "(extra relora_every)", _relora_tensors, lambda o, i, r: r, default_lr=1e-3,
                               options=("rank", "alpha", "dropout", "targets", "init")))
