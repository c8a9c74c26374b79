"""Save/load DLRT models whose ranks changed during training (safetensors + JSON metadata).

A fresh model built from code has the *initial* ranks; a checkpoint has the trained ones. Loading therefore resizes
each layer's factors to the stored shapes before anything else (``load_lowrank_state``), and only then may an
optimizer state be loaded (``KLSOptimizer.load_state_dict`` checks that the ranks agree).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write
from .layers import lowrank_layers

TRANSIENT = ("K", "L")  # live only inside a KLS step, never saved


def _transient_names(model: nn.Module) -> set[str]:
    return {f"{name}.{t}" if name else t for name, _ in lowrank_layers(model) for t in TRANSIENT}


def lowrank_state(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """U, S, V, bias of every low-rank layer plus the model's other (trainable) parameters and all buffers."""
    skip = _transient_names(model)
    state = {n: p.detach() for n, p in model.named_parameters()
             if n not in skip and (p.requires_grad or not trainable_only)}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return state


def load_lowrank_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = False) -> None:
    """Load ``state`` into ``model``, resizing low-rank factors to the stored ranks first.

    ``strict=True`` also demands that every parameter/buffer of the model (except K, L) is in ``state``.
    Raises KeyError naming unknown keys, ValueError naming a key whose shape does not fit. Everything is
    checked before the first factor is set or tensor copied, so a failed load leaves the model unchanged.
    """
    state = dict(state)
    given = set(state)
    factors = []  # (name, layer, U, S, V), applied only once everything is checked
    for name, layer in lowrank_layers(model):
        pre = f"{name}." if name else ""
        keys = [pre + k for k in ("U", "S", "V")]
        present = [k in state for k in keys]
        if any(present) and not all(present):
            raise KeyError(f"low-rank layer {name!r}: state has {[k for k, p in zip(keys, present) if p]} but "
                           f"needs all of {keys}")
        if all(present):
            u, s, v = (state.pop(k) for k in keys)
            _check_factors(name, layer, u, s, v)
            factors.append((layer, u, s, v))
    skip = _transient_names(model)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"state has keys the model does not: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for key, value in state.items():
        target = own[key]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
    if strict:
        missing = sorted(k for k in own if k not in given and k not in skip)
        if missing:
            raise KeyError(f"state lacks keys of the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for layer, u, s, v in factors:
        layer.set_factors(u.to(layer.U.device), s.to(layer.S.device), v.to(layer.V.device))
        layer.S.grad = None
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(device=own[key].device, dtype=own[key].dtype))


def _check_factors(name: str, layer: nn.Module, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
    """What ``set_factors`` needs, checked up front with the layer's name in the message."""
    shapes = f"stored U{tuple(u.shape)} S{tuple(s.shape)} V{tuple(v.shape)}"
    top = min(layer.n, layer.m)
    if u.ndim != 2 or s.ndim != 2 or v.ndim != 2:
        raise ValueError(f"low-rank layer {name!r}: {shapes}; U, S and V must be matrices")
    if not (1 <= u.shape[1] <= top and 1 <= v.shape[1] <= top):
        raise ValueError(f"low-rank layer {name!r}: {shapes}; rank must be in [1, min(out, in) = {top}]")
    if u.shape[0] != layer.n or v.shape[0] != layer.m or tuple(s.shape) != (u.shape[1], v.shape[1]):
        raise ValueError(f"low-rank layer {name!r}: {shapes} do not fit a {layer.n}x{layer.m} weight "
                         f"(U n x r, S r x r', V m x r')")


def save_lowrank(model: nn.Module, path: str | Path, trainable_only: bool = False) -> Path:
    """Write the model's low-rank state to ``path`` (safetensors, atomic) with the ranks in its metadata."""
    path = Path(path)
    tensors = {k: v.contiguous().cpu() for k, v in lowrank_state(model, trainable_only).items()}
    meta = {"format": "leantrain-dlrt", "ranks": json.dumps({n: m.rank for n, m in lowrank_layers(model)})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_lowrank(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, int]:
    """Load a file written by ``save_lowrank`` into a model with the same architecture; returns the ranks."""
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({exc})") from None
    load_lowrank_state(model, state, strict=strict)
    return {n: m.rank for n, m in lowrank_layers(model)}
