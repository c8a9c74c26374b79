"""``--layerwise``: the optimizer step inside backward, so only one gradient is alive at a time.

Each trainable parameter gets a ``register_post_accumulate_grad_hook``. Autograd runs it once per backward, right
after the parameter's gradient is complete (all uses summed, tied weights included); the hook clips that gradient,
checks it, calls ``optimizer.step()`` and frees it. Every other parameter has no gradient at that moment (stepped
ones were freed, later ones do not exist yet), so the shared optimizer steps exactly this parameter: its
``state_dict`` and the checkpoint format are the ordinary ones, and any optimizer works unchanged (leantrain's
BlockOptimizer family with its codecs and GaLore projector refreshes, torch's AdamW, the bf16 compensation wrapper).

Semantics that differ from the ordinary step, by necessity (the global gradient never exists):

* ``--grad-clip C`` clips *each parameter's* gradient norm to C (torch's ``clip_grad_norm_`` formula per
  parameter). With ``--grad-clip none`` the update equals the ordinary step.
* ``--nan-policy``: a non-finite loss is caught before backward (stop: raise; skip: no backward, no update, as
  ordinarily). A non-finite gradient of one parameter with a finite loss: stop raises naming it; skip drops that
  parameter's update only (parameters stepped earlier in this backward keep theirs).
* ``--grad-accum > 1`` is refused (config): stepping per micro-batch would change the update rule.
* Shape-changing methods (DLRT's multi-pass integrator), FSDP and DDP (their gradient sync runs after the local
  accumulation this hook fires on) are refused.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


@dataclass
class LayerwiseStep:
    """The hooks of one run; ``step`` is the loop's current step (for error messages)."""

    optimizer: torch.optim.Optimizer
    model: nn.Module
    grad_clip: float | None = None
    nan_policy: str = "stop"
    step: int = 0
    skipped_updates: int = 0  # parameter updates dropped by --nan-policy skip
    handles: list[Any] = field(default_factory=list)
    peak_grad_bytes: int = 0  # most gradient bytes alive at a hook (the measured point of --layerwise)
    stepped: int = 0  # parameters stepped in the current backward
    on_update: Callable[[int, int], None] | None = None  # (stepped, total): progress inside a long backward

    def start_step(self, step: int) -> None:
        """Called by the loop before each backward."""
        self.step, self.stepped = step, 0

    def register(self) -> LayerwiseStep:
        """Hook every parameter the optimizer holds; returns self."""
        for p in optimizer_parameters(self.optimizer):
            self.handles.append(p.register_post_accumulate_grad_hook(self._hook))
        return self

    def remove(self) -> None:
        """Detach the hooks (the model trains with ordinary steps afterwards)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        """Clip, check, step and free the gradient of ``p``."""
        grad = p.grad
        if grad is None:
            return
        self.peak_grad_bytes = max(self.peak_grad_bytes, live_grad_bytes(self.model))
        if not bool(torch.isfinite(grad).all()):
            self._non_finite(p)
            return
        if self.grad_clip:
            clip_parameter_grad_(grad, self.grad_clip)
        self.optimizer.step()
        p.grad = None
        self.stepped += 1
        if self.on_update is not None:
            self.on_update(self.stepped, len(self.handles))

    def _non_finite(self, p: Tensor) -> None:
        """stop: raise naming the parameter; skip: drop this parameter's update."""
        if self.nan_policy == "stop":
            name = next((n for n, q in self.model.named_parameters() if q is p), "?")
            raise FloatingPointError(f"step {self.step + 1}: non-finite gradient in {name} (--layerwise); rerun "
                                     "with --nan-policy skip to skip such updates")
        self.skipped_updates += 1
        p.grad = None


def clip_parameter_grad_(grad: Tensor, max_norm: float) -> Tensor:
    """Scale ``grad`` in place so its norm is at most ``max_norm`` (torch's clip coefficient, for one tensor)."""
    norm = torch.linalg.vector_norm(grad.float())
    coef = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
    grad.mul_(coef.to(grad.dtype))
    return grad


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every group, once."""
    seen: dict[int, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def live_grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients that exist right now."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
