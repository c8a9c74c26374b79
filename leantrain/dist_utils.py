"""Rank-local views for memory figures under FSDP2 (DTensor parameters, gradients and optimizer states).

``DTensor.numel()`` is the *global* element count, so summing ``numel() * element_size()`` over an FSDP2 model or
its optimizer state reports the unsharded size on every rank. These helpers count what this process actually
holds (``to_local()``), which is the number that halves from 1 to 2 processes. Plain tensors pass through, so
the same code gives the single-process figure.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication); a plain tensor is returned unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by this process for the given tensors (non-tensors are ignored)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = local_tensor(t)
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes_local(optimizer: Any) -> int:
    """Bytes of this rank's optimizer state tensors (``optimizer.state[p][key]``, DTensors counted locally)."""
    return sum(local_bytes(s.values()) for s in getattr(optimizer, "state", {}).values() if isinstance(s, dict))


def grad_bytes_local(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of this rank's gradients (FSDP2 keeps reduce-scattered, i.e. sharded, gradients)."""
    return local_bytes(p.grad for p in parameters if p.grad is not None)


def average_gradients(parameters: Iterable[torch.Tensor], world: int) -> None:
    """Mean of every existing gradient over all processes (one all-reduce per dtype), in place.

    DDP's job done by hand, for methods DDP's reducer cannot follow: DLRT's KLS integrator runs several
    backward passes per step, each touching a different subset of parameters, and replaces parameters with new
    shapes when the rank adapts. Every rank must pass the same parameters in the same order with the same
    gradient presence, which holds when every rank runs the same deterministic method on its batch shard."""
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if world <= 1 or not grads:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
