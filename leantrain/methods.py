"""Training-method registry: a method decides *which* parameters train and how they are shaped.

A method object is its own spec. It has ``name``, ``default_lr``, ``summary`` and
``apply(model, cfg, calib) -> list[param_group]`` (changes the model in place -- freezes the base, injects
adapters, converts layers -- and returns the torch param groups it wants optimised: LoRA+ returns two groups with
different learning rates, GradNormLoRP tags its groups with ``rank``/``update_proj_gap`` for a projected
optimizer). The task head is not the method's business: the run assembly always trains it.

Declared flags and hooks (defaults in :class:`MethodBase`, so a method only writes what differs):
  * ``trains_base``: the pretrained weights train (no quantized frozen base; GaLore may project them);
  * ``changes_parameter_shapes``: parameters are replaced mid-run (no DDP wrapper, no FSDP);
  * ``tasks``: the tasks it supports; ``validate(cfg)``: refuse its own bad options in one line;
  * ``estimator_tensors(module, out_f, in_f, cfg)`` / ``activation_bytes_per_token(...)``: what it adds per
    adapted Linear, for ``leantrain memory``;
  * ``trainable_state`` / ``load_trainable_state`` (what a checkpoint holds), ``wrap_optimizer`` (multi-pass
    integrators), ``save_artifacts`` (PEFT files), ``metrics`` (e.g. DLRT ranks) -- looked up with ``getattr``.

Each method's module calls :func:`register` on import; this file only lists those modules (``_MODULES``), so a
new method is its own file plus one entry there.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .registry import Registry
from .targets import is_head

if TYPE_CHECKING:
    from .config import TrainConfig

# Yields scalar training losses (with graph) for a few batches, for data-dependent init (SHiRA gradient masks).
Calibration = Callable[[nn.Module], Iterable[torch.Tensor]]

# Modules that register methods when imported (each holds one method family).
_MODULES = (
    "leantrain.methods",
    "leantrain.adapters.methods",
    "leantrain.adapters.lora_fa",
    "leantrain.adapters.loldu",
    "leantrain.adapters.relora",
    "leantrain.lm.sltrain",
    "leantrain.gradnormlorp",
    "leantrain.lowrank.method",
    "leantrain.lm.lowrank",
)


class Method(Protocol):
    name: str
    default_lr: float
    summary: str
    trains_base: bool
    changes_parameter_shapes: bool
    tasks: tuple[str, ...]

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]: ...

    def validate(self, cfg: TrainConfig) -> None: ...

    def estimator_tensors(self, module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]: ...

    def activation_bytes_per_token(self, out_f: int, in_f: int, rank: int, elt: int) -> int: ...


@dataclass(frozen=True)
class EstimatorTensor:
    """A tensor a method adds per adapted Linear, for ``leantrain memory``.

    ``trains``: it has a gradient and optimizer state (else frozen); ``stored``: it is kept between steps (DLRT's
    K and L exist only inside a step); ``projectable``: a projected optimizer keeps its moments low-rank;
    ``base``: it replaces the base weight (counted with the base weights, not as adapter weights)."""

    name: str
    shape: tuple[int, ...]
    trains: bool = True
    stored: bool = True
    projectable: bool = False
    base: bool = False


class MethodBase:
    """Defaults of the declared flags and hooks (see the module docstring)."""

    name = ""
    default_lr = 1e-3
    summary = ""
    trains_base = False
    changes_parameter_shapes = False
    tasks: tuple[str, ...] = ("classify", "causal-lm")
    uses_targets = True  # it changes the Linears selected by --targets (full and head do not)
    replaces_targets = False  # those Linears' weights are replaced by the method's tensors (DLRT, GradNormLoRP)

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        raise NotImplementedError

    def validate(self, cfg: TrainConfig) -> None:
        """Raise ValueError naming the option for settings this method cannot honour (default: none)."""

    def estimator_tensors(self, module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
        """Tensors added per adapted (out_f x in_f) Linear (default: none -- the method adds no tensors)."""
        return []

    def activation_bytes_per_token(self, out_f: int, in_f: int, rank: int, elt: int) -> int:
        """Extra activation bytes per token that one adapted Linear keeps for backward (default: none)."""
        return 0

    def trains_other(self, opts: Any) -> bool:
        """Whether base parameters outside the targeted Linears train (estimator; default: ``trains_base``)."""
        return self.trains_base

    def estimator_extras(self, targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
        """Bytes beyond the per-layer tensors over all (module, out_f, in_f) targets, keyed by the estimator's
        detail names: ``weights.*`` (added to the adapter weights) or ``gradients.*`` (alive through the step)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_REGISTRY: Registry[Method] = Registry("method", _MODULES)
register = _REGISTRY.register
specs = _REGISTRY.all
available_methods = _REGISTRY.names
get_method = _REGISTRY.get


def head_module(model: nn.Module) -> nn.Module | None:
    """The task head every method trains (``model.classifier`` for the classifiers built by leantrain)."""
    return getattr(model, "classifier", None)


def head_parameter_names(model: nn.Module) -> set[str]:
    head = head_module(model)
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


class FullFineTuning(MethodBase):
    """Every parameter trains (the reference every memory saving is measured against)."""

    name = "full"
    default_lr = 5e-5
    summary = "full fine-tuning: every parameter trains"
    trains_base = True
    uses_targets = False

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        head = head_parameter_names(model)
        # Output heads (targets.is_head) stay dense: GaLore projects attention/MLP matrices only, as in the paper.
        linear_ids = {id(m.weight) for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not is_head(name)}
        linear, other = [], []
        for n, p in model.named_parameters():
            p.requires_grad_(True)
            if n not in head:
                (linear if id(p) in linear_ids else other).append(p)
        # Named groups: a projected optimizer (GaLore) projects only the "linear" matrices, as in the paper.
        groups = [{"params": linear, "name": "linear"}, {"params": other, "name": "other"}]
        return [g for g in groups if g["params"]]


class HeadOnly(MethodBase):
    """Frozen encoder, trainable head: the cheapest baseline (linear probing)."""

    name = "head"
    default_lr = 2e-3
    summary = "linear probing: frozen model, only the task head trains"
    uses_targets = False
    tasks = ("classify",)  # a causal LM has no fresh head: nothing would train

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        return []


FULL = register(FullFineTuning())
HEAD = register(HeadOnly())


def default_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint contents when a method has no ``trainable_state`` hook: trainable params + all buffers."""
    state: dict[str, Any] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return state


def checkpoint_contents(method: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of ``model`` for ``method``: its ``trainable_state`` hook, else the default."""
    hook = getattr(method, "trainable_state", None)
    return hook(model) if hook else default_trainable_state(model)
