"""Training-method registry: a method decides *which* parameters train and how they are shaped.

A method is any object with ``name``, ``default_lr`` and ``apply(model, cfg, calib) -> list[param_group]``.
``apply`` changes the model in place (freezes the base, injects adapters, converts layers) and returns the
torch param groups it wants optimised -- e.g. LoRA+ returns two groups with different learning rates, and
GradNormLoRP tags its groups with ``rank``/``update_proj_gap`` keys for a projected optimizer. The task head
(``model.classifier``) is not the method's business: the training loop always trains it.

Optional hooks, looked up with ``getattr`` so a method only writes what it needs:
  * ``trainable_state(model) -> dict[str, Tensor]`` / ``load_trainable_state(model, state)``: what a checkpoint
    holds (default: parameters that require grad plus all buffers).
  * ``wrap_optimizer(optimizer, model, cfg)``: return an optimizer-like object whose ``step(closure)`` may run
    several forward/backward passes (DLRT's KLS integrator).
  * ``save_artifacts(model, run_dir, cfg)``: write the method's deliverables (e.g. PEFT adapter files).

Registry entries are ``"module:attribute"`` strings resolved on first use, so ``leantrain --help`` does not
import every method, and a new method is one file plus one line here.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn

from .config import TrainConfig
from .targets import is_head

# Yields scalar training losses (with graph) for a few batches, for data-dependent init (SHiRA gradient masks).
Calibration = Callable[[nn.Module], Iterable[torch.Tensor]]


class Method(Protocol):
    name: str
    default_lr: float

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]: ...


METHODS: dict[str, str] = {
    "full": "leantrain.methods:FULL",
    "head": "leantrain.methods:HEAD",
    "lora": "leantrain.adapters.methods:LORA",
    "rslora": "leantrain.adapters.methods:RSLORA",
    "dora": "leantrain.adapters.methods:DORA",
    "pissa": "leantrain.adapters.methods:PISSA",
    "vera": "leantrain.adapters.methods:VERA",
    "miss": "leantrain.adapters.methods:MISS",
    "shira": "leantrain.adapters.methods:SHIRA",
    "gradnormlorp": "leantrain.optim.gradnorm:GRADNORMLORP",
    "dlrt": "leantrain.lowrank.method:DLRT",
    "lowrank": "leantrain.lm.lowrank:LOWRANK",
}


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """Resolve a registry name to its method object; unknown names list the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    module_name, attr = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"method {name!r} is registered but its module {module_name} is missing: {exc}") from exc
    return getattr(module, attr)


def head_module(model: nn.Module) -> nn.Module | None:
    """The task head every method trains (``model.classifier`` for the classifiers built by leantrain)."""
    return getattr(model, "classifier", None)


def head_parameter_names(model: nn.Module) -> set[str]:
    head = head_module(model)
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


class FullFineTuning:
    """Every parameter trains (the reference every memory saving is measured against)."""

    name = "full"
    default_lr = 5e-5

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


class HeadOnly:
    """Frozen encoder, trainable head: the cheapest baseline (linear probing)."""

    name = "head"
    default_lr = 2e-3

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        return []


FULL = FullFineTuning()
HEAD = HeadOnly()


def default_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint contents when a method has no ``trainable_state`` hook: trainable params + all buffers."""
    state: dict[str, Any] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return state
