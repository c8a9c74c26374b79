"""KLSOptimizer: the rank-adaptive KLS ("unconventional BUG") integrator of DLRT as an optimizer object.

Paper: Schotthöfer et al., "Low-rank lottery tickets", NeurIPS 2022, https://arxiv.org/abs/2205.13571;
spec: /work/shared/methods/dlrt.md. A user's loop stays ``loss = opt.step(closure)``, where ``closure()`` zeroes
the grads, runs forward+backward on the current batch and returns the loss.

One step (λ = the inner optimizer's update, SGD = explicit Euler as in the paper):
  1. K = U S, L = V Sᵀ; one forward+backward in "kl" mode gives ∇K = G V and ∇L = Gᵀ U at W0 (+ the grads
     of biases and all non-low-rank parameters at W0, which are held back), inner step on K, L only.
  2. Û = orth([U | K1]), V̂ = orth([V | L1]); S̃ = (ÛᵀU) S (V̂ᵀV)ᵀ, so Û S̃ V̂ᵀ = W0.
  3. ∇S = Ûᵀ G V̂ from the cached layer inputs/output-grads (adaptive default; ``recompute_s=True`` runs the
     closure again in the augmented basis instead), inner step on S, biases and the other parameters.
  4. SVD of Ŝ, keep the smallest rank whose discarded tail has norm < τ·||σ|| (clamped to the layer bounds).
Fixed-rank mode (``tau=None``): Û = orth(K1), V̂ = orth(L1) (r columns), no truncation, and ∇S is taken at the new
point U1 S̃ V1ᵀ ≠ W0, so the closure runs twice (spec Section 3).

Optimizer state of K, L, S lives in the inner torch optimizer, keyed by the same Parameter objects across
steps. Whenever a basis changes, every state tensor of that layer is moved to the new basis (``kls.transport``),
so its shape always matches the factor it belongs to -- also after a rank change. Theory covers SGD only;
Adam on K, L, S works in practice but is not covered by the paper's guarantees (spec Section 4).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .kls import SECOND_MOMENT_KEYS, augment, orth, svd_truncate, transport
from .layers import LowRankMixin, lowrank_layers

InnerSpec = str | Callable[[list[dict]], torch.optim.Optimizer] | torch.optim.Optimizer
INNER = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _collect(model_or_layers: Any) -> tuple[dict[str, LowRankMixin], list[nn.Parameter]]:
    """Low-rank layers by name, plus the other trainable parameters when a whole model is given."""
    if isinstance(model_or_layers, LowRankMixin):
        return {"": model_or_layers}, []
    if isinstance(model_or_layers, nn.Module):
        layers = dict(lowrank_layers(model_or_layers))
        own = {id(p) for layer in layers.values() for p in layer.parameters()}
        others = [p for p in model_or_layers.parameters() if p.requires_grad and id(p) not in own]
    elif isinstance(model_or_layers, Mapping):
        layers, others = dict(model_or_layers), []
    else:
        layers, others = {str(i): layer for i, layer in enumerate(model_or_layers)}, []
    if not layers:
        raise ValueError("KLSOptimizer: no LowRankLinear/LowRankConv2d layers found (convert the model first with "
                         "leantrain.lowrank.convert_to_lowrank)")
    for name, layer in layers.items():
        if not isinstance(layer, LowRankMixin):
            raise TypeError(f"KLSOptimizer: layer {name!r} is {type(layer).__name__}, not a low-rank layer")
    return layers, others


class KLSOptimizer(torch.optim.Optimizer):
    """Rank-adaptive DLRT integrator around any torch optimizer for the factor updates.

    Args:
        model_or_layers: a model (all its low-rank layers; its other trainable parameters are updated together
            with S), a low-rank layer, a list of them, or a dict name -> layer.
        inner: "sgd" | "adam" | "adamw", a factory ``groups -> Optimizer``, or an existing optimizer that already
            holds the layers' K, L, S (and bias) parameters (what ``DLRT.wrap_optimizer`` passes).
        lr: learning rate for a named/factory inner optimizer.
        tau: truncation tolerance relative to ||σ(Ŝ)||₂ (absolute with ``absolute_tau=True``); None = fixed rank.
        recompute_s: take ∇S from a second forward/backward instead of cached activations.
        **inner_kwargs: passed to the named inner optimizer (momentum, betas, weight_decay, ...).
    """

    def __init__(self, model_or_layers: Any, inner: InnerSpec = "sgd", lr: float | None = None,
                 tau: float | None = 0.1, *, absolute_tau: bool = False, recompute_s: bool = False,
                 **inner_kwargs: Any):
        if tau is not None and not tau > 0:
            raise ValueError(f"KLSOptimizer: tau={tau!r} must be > 0 (or None for fixed rank)")
        self.layers, others = _collect(model_or_layers)
        self.tau, self.absolute_tau, self.recompute_s = tau, absolute_tau, recompute_s
        factors = [p for layer in self.layers.values() for p in (layer.K, layer.L, layer.S)]
        rest = [layer.bias for layer in self.layers.values() if layer.bias is not None] + others
        groups = [{"params": factors, "name": "lowrank"}] + ([{"params": rest, "name": "other"}] if rest else [])
        if isinstance(inner, torch.optim.Optimizer):
            held = {id(p) for g in inner.param_groups for p in g["params"]}
            for name, layer in self.layers.items():
                for pname in ("K", "L", "S"):
                    if id(getattr(layer, pname)) not in held:
                        raise ValueError(f"KLSOptimizer: the given inner optimizer does not hold {name}.{pname}; "
                                         "build it from DLRT.apply's param groups")
            self.inner = inner
        elif isinstance(inner, str):
            if inner not in INNER:
                raise ValueError(f"KLSOptimizer: unknown inner optimizer {inner!r}; choose one of {sorted(INNER)}")
            if lr is None or not lr > 0:
                raise ValueError(f"KLSOptimizer: lr={lr!r} must be > 0 for inner={inner!r}")
            self.inner = INNER[inner](groups, lr=lr, **inner_kwargs)
        elif callable(inner):
            self.inner = inner(groups)
            if not isinstance(self.inner, torch.optim.Optimizer):
                raise TypeError(f"KLSOptimizer: inner factory returned {type(self.inner).__name__}, not an Optimizer")
        else:
            raise TypeError(f"KLSOptimizer: inner must be a name, a factory or an Optimizer, got {type(inner)!r}")
        # Share param_groups/state with the inner optimizer so LR schedulers and zero_grad act on it directly.
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self.defaults = self.inner.defaults
        self.steps = 0
        self._index()
        self._ready = True

    # --- reporting ------------------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    # --- parameter swaps and state moves ----------------------------------------------------------------------
    def _index(self) -> None:
        self._where = {id(p): (gi, pi) for gi, g in enumerate(self.inner.param_groups) for pi, p in enumerate(g["params"])}

    def _set(self, layer: LowRankMixin, pname: str, data: torch.Tensor) -> nn.Parameter:
        """Give ``layer.<pname>`` new data. A new shape gets a *new* Parameter (swapped into the inner optimizer's
        groups and state): resizing a leaf in place breaks autograd while any old graph still references it."""
        old = getattr(layer, pname)
        if old.shape == data.shape:
            old.data = data
            old.grad = None
            return old
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        old.grad = None  # a caller holding the old object (a cached param list) must not see a stale gradient
        setattr(layer, pname, new)
        gi, pi = self._where.pop(id(old))
        self.inner.param_groups[gi]["params"][pi] = new
        self._where[id(new)] = (gi, pi)
        if old in self.inner.state:
            self.inner.state[new] = self.inner.state.pop(old)
        return new

    def _move_state(self, p: nn.Parameter, left: torch.Tensor | None, right: torch.Tensor | None) -> None:
        state = self.inner.state.get(p)
        if not state:
            return
        decoded = getattr(self.inner, "decoded_moments", None)
        if decoded is not None:  # leantrain optimizers keep moments flat and maybe quantized: decode, move, encode
            moved = {key: transport(value, left, right, squared=key in SECOND_MOMENT_KEYS)
                     for key, value in decoded(p).items()}
            self.inner.store_moments(p, moved)
            return
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.ndim == 2:
                state[key] = transport(value, left, right, squared=key in SECOND_MOMENT_KEYS)

    # --- the step -------------------------------------------------------------------------------------------
    def _run(self, closure: Callable[[], Any]) -> Any:
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One KLS step on the batch ``closure`` evaluates; returns the (detached) loss at the start point W0."""
        if closure is None:
            raise ValueError("KLSOptimizer.step needs a closure (it runs forward+backward itself, once or twice)")
        adaptive = self.tau is not None
        cached = adaptive and not self.recompute_s
        layers = list(self.layers.values())
        old, loss = self._kl_pass(layers, closure, cached)
        reached = {layer: layer.K.grad is not None or layer.L.grad is not None for layer in layers}
        if not any(reached.values()):  # the closure dropped all grads (e.g. nan-policy "skip"): no update at all
            for layer in layers:
                layer.pop_cache()
                self._drop_kl(layer)
            return loss.detach() if isinstance(loss, torch.Tensor) else loss
        held = self._hold_other_grads(layers)
        self.inner.step()  # K- and L-step only; everything else waits for the S-step at the same point
        bases = self._augment(layers, old, adaptive)
        if cached:
            self._s_grads_from_cache(layers, bases, reached, held)
        else:
            for layer in layers:
                layer.U, layer.V = bases[layer]
            self._run(closure)  # zeroes all grads first, so K/L grads from pass 1 are gone
            for layer in layers:
                layer.K.grad = layer.L.grad = None
        self.inner.step()
        for layer in layers:
            self._truncate_and_move(layer, old[layer], bases[layer], adaptive)
        self.steps += 1
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    def _kl_pass(self, layers: list[LowRankMixin], closure: Callable[[], Any], cached: bool) -> tuple[dict, Any]:
        """K = U S, L = V Sᵀ and one forward+backward in "kl" mode (∇K = G V, ∇L = Gᵀ U at W0)."""
        old = {}
        for layer in layers:
            u0, s0, v0 = layer.U, layer.S.detach().clone(), layer.V
            old[layer] = (u0, s0, v0)
            self._set(layer, "K", u0 @ s0)
            self._set(layer, "L", v0 @ s0.T)
            layer.S.grad = None
            layer.mode, layer.cache = "kl", cached
            layer.pop_cache()
        try:
            loss = self._run(closure)
        finally:
            for layer in layers:
                layer.mode, layer.cache = "s", False
        return old, loss

    def _drop_kl(self, layer: LowRankMixin) -> None:
        """K and L exist only inside a step: back to zero-size placeholders (their state stays keyed to them)."""
        self._set(layer, "K", layer.K.detach().new_empty(0))
        self._set(layer, "L", layer.L.detach().new_empty(0))

    def _hold_other_grads(self, layers: list[LowRankMixin]) -> dict[nn.Parameter, torch.Tensor]:
        """Take every non-factor gradient out of the K/L-step; it is stepped with S, at the same point W0."""
        factor_ids = {id(p) for layer in layers for p in (layer.K, layer.L, layer.S)}
        held = {}
        for group in self.inner.param_groups:
            for p in group["params"]:
                if id(p) not in factor_ids and p.grad is not None:
                    held[p], p.grad = p.grad, None
        return held

    def _augment(self, layers: list[LowRankMixin], old: dict, adaptive: bool) -> dict:
        """Û = orth([U | K1]), V̂ = orth([V | L1]) (fixed rank: orth(K1), orth(L1)); S̃ expresses W0 in them."""
        bases = {}
        for layer in layers:
            u0, s0, v0 = old[layer]
            k1, l1 = layer.K.detach(), layer.L.detach()
            u_hat = augment(u0, k1) if adaptive else orth(k1)
            v_hat = augment(v0, l1) if adaptive else orth(l1)
            m, n = u_hat.T @ u0, v_hat.T @ v0
            bases[layer] = (u_hat, v_hat)
            self._move_state(layer.S, m, n)
            self._set(layer, "S", (m @ s0 @ n.T).contiguous())
            layer.K.grad = layer.L.grad = None
        return bases

    def _s_grads_from_cache(self, layers: list[LowRankMixin], bases: dict, reached: dict, held: dict) -> None:
        """∇S = Ûᵀ G V̂ from the layer inputs / output gradients cached in the K/L pass; restore held grads."""
        for layer in layers:
            u_hat, v_hat = bases[layer]
            cache = layer.pop_cache()
            if not reached[layer]:
                cache = []  # the closure dropped this step's grads (e.g. a non-finite loss): no S-step either
            grads = [layer.project_grad(x, dy, u_hat, v_hat) for x, dy in cache]
            layer.S.grad = torch.stack(grads).sum(0).to(layer.S.dtype) if grads else None
            layer.U, layer.V = u_hat, v_hat
        for p, g in held.items():
            p.grad = g
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # S's gradient came from cached activations, outside the closure: average it like the rest
            from ..dist_utils import average_gradients

            average_gradients([layer.S for layer in layers], torch.distributed.get_world_size())

    def _truncate_and_move(self, layer: LowRankMixin, old: tuple, bases: tuple, adaptive: bool) -> None:
        """Adaptive: SVD of Ŝ, keep the τ-rank; then move K/L state to the final bases and drop K, L."""
        u0, _, v0 = old
        u_hat, v_hat = bases
        if adaptive:
            s_hat = layer.S.detach()
            p_r, sigma, q_r = svd_truncate(s_hat, self.tau, layer.min_rank, layer.max_rank, self.absolute_tau)
            u1, v1 = u_hat @ p_r, v_hat @ q_r
            self._move_state(layer.S, p_r.T, q_r.T)
            self._set(layer, "S", torch.diag(sigma))
            layer.U, layer.V = u1.contiguous(), v1.contiguous()
        else:
            u1, v1 = u_hat, v_hat
        self._move_state(layer.K, None, v1.T @ v0)  # K's columns pair with V
        self._move_state(layer.L, None, u1.T @ u0)  # L's columns pair with U
        self._drop_kl(layer)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """{"inner": inner optimizer state, "ranks": {layer: rank}, "steps": int} -- tensors and numbers only."""
        return {"inner": self.inner.state_dict(), "ranks": self.ranks(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load after the model's factors (ranks must match; see ``load_lowrank_state``)."""
        for key in ("inner", "ranks"):
            if key not in state_dict:
                raise KeyError(f"KLSOptimizer.load_state_dict: missing key {key!r}")
        now = self.ranks()
        if set(state_dict["ranks"]) != set(now):
            raise ValueError(f"KLSOptimizer.load_state_dict: layers {sorted(state_dict['ranks'])} != {sorted(now)}")
        for name, r in state_dict["ranks"].items():
            if int(r) != now[name]:
                raise ValueError(f"KLSOptimizer.load_state_dict: layer {name!r} has rank {now[name]} but the state "
                                 f"was saved at rank {r}; load the model's low-rank state first")
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        self._index()
        self.state = self.inner.state
        self.steps = int(state_dict.get("steps", 0))
        stored_numel = getattr(self.inner, "stored_numel", None)
        for name, layer in self.layers.items():
            expect = {"K": (layer.n, layer.rank), "L": (layer.m, layer.rank), "S": (layer.rank, layer.rank)}
            for pname, shape in expect.items():
                p = getattr(layer, pname)
                got = stored_numel(p) if stored_numel is not None else 0
                if got and got not in (shape[0] * shape[1], shape[0] * shape[1] + 1):  # +1: packed 4-bit padding
                    raise ValueError(f"KLSOptimizer.load_state_dict: the state of {name}.{pname} holds {got} values "
                                     f"per moment, expected {shape[0] * shape[1]} for shape {shape}")
                for key, value in self.inner.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim == 2 and tuple(value.shape) != shape:
                        raise ValueError(f"KLSOptimizer.load_state_dict: state {key!r} of {name}.{pname} has shape "
                                         f"{tuple(value.shape)}, expected {shape}")

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_ready", False):
            self.inner.add_param_group(param_group)
            self._index()
        else:
            super().add_param_group(param_group)
