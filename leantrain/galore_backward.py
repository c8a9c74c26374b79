"""``--galore-in-backward``: GaLore's low-rank gradient computed inside each Linear's backward.

A GaLore optimizer (optim/galore.py, optim/projector.py) uses only the coordinates of a weight gradient
``G = dY^T X`` in its basis: ``G P^T`` (right, P r x n) or ``P^T G`` (left, P m x r). Between refreshes the basis is
fixed, so those coordinates come straight from the layer's factors -- ``dY^T (X P^T)`` or ``(dY P)^T X``
(``projector.project_factors``) -- and the m x n gradient is never built: 2 t r (m + n) multiply-adds instead of
2 t m n (+ 2 m n r for the projection), and r/m (or r/n) of the gradient bytes. On a refresh step (and the first
step, before any basis exists) the backward builds the full gradient once, as torch's Linear does, and the
optimizer computes the new basis from it exactly as before, so the trajectory is today's GaLore up to float
rounding.

How it is wired (``install``): each ``nn.Linear`` whose weight sits in a projected param group gets a forward that
runs :class:`ProjectedLinear`, an autograd Function whose backward returns either the weight gradient or, in its
place, the gradient of a *proxy*: a zero-byte leaf tensor of the low-rank shape. Autograd therefore sums the
low-rank gradients of every use of the weight (shared modules, activation-checkpoint recomputation, micro-batches:
projection is linear) and fires the proxy's post-accumulate hook once, which hands the sum to the optimizer state
(``projector.SUPPLIED_GRAD``); the optimizer step consumes it (``BlockOptimizer._update``) and ``zero_grad`` drops
an unconsumed one. With ``--layerwise`` the hook then steps the weight at once (``LayerwiseStep.step_supplied``).
Whether a backward projects is read from the optimizer state at backward time (``needs_refresh`` for the step
about to be taken), so a resumed run makes the same choices.

Not covered, refused by the config or the run assembly: a global ``--grad-clip`` (the norm of the full gradient
never exists between refreshes), autocast (``--master-weights fp32``), torchrun (DDP/FSDP2). Parameters that are not
the weight of an ``nn.Linear`` called through its module (embeddings, norms, a weight used by functional code)
keep the ordinary path. Known gap: the loop's non-finite check sees the loss and the full gradients only, so a
non-finite low-rank gradient with a finite loss is caught by the optimizer's own check, which raises even under
``--nan-policy skip`` (with ``--layerwise`` the hook skips it as usual). ``leantrain memory`` still counts full
gradients for these runs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .optim.projector import SUPPLIED_GRAD, current_basis, low_rank_shape, needs_refresh, project_factors

ReadyHook = Callable[[Tensor, Tensor], None]  # (weight, its complete low-rank gradient)


class LowRankSource:
    """One projected weight: its proxy leaf and the optimizer whose state holds its basis and step count."""

    def __init__(self, weight: nn.Parameter, optimizer: torch.optim.Optimizer, shape: tuple[int, int],
                 on_ready: ReadyHook | None) -> None:
        self.weight, self.optimizer, self.on_ready = weight, optimizer, on_ready
        self.proxy = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(shape).requires_grad_()
        self.handle = self.proxy.register_post_accumulate_grad_hook(self._ready)

    def basis(self) -> tuple[Tensor, int, Tensor | None] | None:
        """(basis, side, right basis) the next step will use, or None when it refreshes (build the full gradient)."""
        state = self.optimizer.state.get(self.weight)
        if not state:
            return None
        group = next(g for g in self.optimizer.param_groups if any(q is self.weight for q in g["params"]))
        if needs_refresh(state, group, int(state["step"]) + 1):  # also true before the first basis exists
            return None
        return current_basis(state, group)

    @torch.no_grad()
    def _ready(self, proxy: Tensor) -> None:
        """Every use of the weight has contributed: move the sum into the optimizer state (and step, layerwise)."""
        low, proxy.grad = proxy.grad, None
        if low is None:  # a refresh step: autograd fires the hook although the backward gave the proxy nothing
            return
        state = self.optimizer.state[self.weight]
        earlier = state.get(SUPPLIED_GRAD)  # an earlier micro-batch of the same step
        state[SUPPLIED_GRAD] = low if earlier is None else earlier.add_(low)
        if self.on_ready is not None:
            self.on_ready(self.weight, state[SUPPLIED_GRAD])
            state.pop(SUPPLIED_GRAD, None)  # not consumed: the update was dropped (--nan-policy skip)


class ProjectedLinear(torch.autograd.Function):
    """``F.linear`` whose backward gives the weight's low-rank gradient (to ``proxy``) between refreshes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, proxy: Tensor,
                source: LowRankSource) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.source, ctx.has_bias = source, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = dy @ weight if ctx.needs_input_grad[0] else None
        gb = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        basis = ctx.source.basis()
        if basis is None:  # refresh (or first) step: the full gradient, once
            return gx, dy2.mT @ x2, gb, None, None
        return gx, None, gb, project_factors(dy2, x2, *basis), None


def _projecting_forward(module: nn.Linear, source: LowRankSource) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and module.weight.requires_grad:
            return ProjectedLinear.apply(x, module.weight, module.bias, source.proxy, source)
        return F.linear(x, module.weight, module.bias)

    return forward


class GaLoreBackward:
    """The installed forwards; ``remove`` restores the modules' own."""

    def __init__(self, modules: dict[str, nn.Linear], sources: dict[int, LowRankSource]) -> None:
        self.modules, self.sources = modules, sources

    def remove(self) -> None:
        for module in self.modules.values():
            del module.forward
        for source in self.sources.values():
            source.handle.remove()
        self.modules, self.sources = {}, {}


def projected_weights(optimizer: torch.optim.Optimizer) -> dict[int, tuple[Tensor, tuple[int, int]]]:
    """id -> (weight, low-rank gradient shape) of every 2-D parameter the optimizer projects."""
    out = {}
    for group in optimizer.param_groups:
        if group.get("rank") is None:
            continue
        for p in group["params"]:
            if p.ndim == 2:
                out[id(p)] = (p, low_rank_shape(p.shape, group))
    return out


def install(model: nn.Module, optimizer: torch.optim.Optimizer, on_ready: ReadyHook | None = None) -> GaLoreBackward:
    """Project inside backward for every ``nn.Linear`` of ``model`` whose weight ``optimizer`` projects.

    ``on_ready(weight, low)`` runs when a weight's low-rank gradient is complete (``--layerwise`` steps there).
    Raises ValueError if no Linear weight is projected (nothing would change)."""
    targets = projected_weights(optimizer)
    modules, sources = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) not in targets:
            continue
        weight, shape = targets[id(module.weight)]
        if id(weight) not in sources:
            sources[id(weight)] = LowRankSource(weight, optimizer, shape, on_ready)
        module.forward = _projecting_forward(module, sources[id(weight)])
        modules[name] = module
    if not modules:
        raise ValueError(f"--galore-in-backward: no nn.Linear weight of {type(model).__name__} is projected by the "
                         f"optimizer ({len(targets)} projected matrices, none the weight of an nn.Linear)")
    return GaLoreBackward(modules, sources)
