"""A block-wise optimizer's state in one layout that does not depend on the number of processes.

At run time (optim/adam.py) an FSDP2 rank stores the moments of *its shard* of each parameter: flat values,
8-bit codes, 4-bit codes packed in global nibble pairs, and the absmax of every global block its shard overlaps
(``shards.py``). For a checkpoint that another number of processes can load, each moment is rewritten in a
*logical* layout whose sharding DCP (torch.distributed.checkpoint) understands:

* values / 8-bit codes: the parameter's shape, ``Shard(0)`` like the parameter (a view: no copy);
* 4-bit codes: ``(rows, per_row // 2)`` bytes when a row holds an even number of values (a view); otherwise one
  byte per value, ``(rows, per_row)``, under the key ``<moment>_codes_unpacked``;
* absmax: the vector of all global blocks, split evenly over ranks (``torch.chunk``), gathered once per tensor.

Everything else (step counters, percentile-clipping history, GaLore's replicated low-rank moments and bases) is
the same on every rank and is saved as replicated. With one process the same layout is made of plain tensors, so
1 -> N, N -> 1 and N -> M all load through one path, exactly (block boundaries never move: they are global).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import quant, shards
from .codecs import BlockwiseCodec

UNPACKED = "_codes_unpacked"


def moment_keys(opt: Any, p: Tensor, group: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """state key -> (suffix, codec) for the moments of ``p`` stored per element (not for projected moments)."""
    if opt._projected(group, p):
        return {}
    out = {}
    for name, signed in opt.moments:
        codec = opt._codec(group, p.numel(), signed, p)
        for sfx in codec.layout(1):
            out[name + sfx] = (sfx, codec)
    return out


def _rows(p: Tensor) -> tuple[int, int]:
    rows = p.shape[0] if p.ndim else 1
    return rows, (p.numel() // rows if rows else 0)


def _geometry(p: Tensor) -> shards.ShardGeometry | None:
    geom = shards.geometry(p)
    if geom is None and hasattr(p, "to_local"):
        raise TypeError(f"checkpointing block-wise optimizer state needs Shard(0) on a 1-D mesh, got "
                        f"{p.placements} for a parameter of shape {tuple(p.shape)}")
    return geom


def _sharded(local: Tensor, p: Tensor, global_shape: tuple[int, ...]) -> Tensor:
    """``local`` (this rank's rows) as a DTensor laid out like ``p`` (plain when ``p`` is plain)."""
    if not hasattr(p, "to_local"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(global_shape),
                              stride=torch.empty(global_shape, device="meta").stride())


def _even_chunk(full: Tensor, p: Tensor) -> Tensor:
    """``full`` (replicated on every rank) as a DTensor split evenly on dim 0 (plain when ``p`` is plain)."""
    if not hasattr(p, "to_local"):
        return full
    mesh = p.device_mesh
    chunks = torch.chunk(full, mesh.size())
    rank = mesh.get_local_rank()
    local = chunks[rank].clone() if rank < len(chunks) else full[:0].clone()
    return _sharded(local, p, tuple(full.shape))


def to_logical(opt: Any, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The state of one parameter in the logical layout (a collective under FSDP2: every rank calls it)."""
    keys = moment_keys(opt, p, group)
    geom = _geometry(p) if keys else None
    rows, per_row = _rows(p)
    local_rows = geom.numel // per_row if geom is not None and per_row else rows
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key not in keys:
            out[key] = value
            continue
        sfx, codec = keys[key]
        four = isinstance(codec, BlockwiseCodec) and codec.bits == 4
        if sfx == "_absmax":
            out[key] = _even_chunk(_full_absmax(value, geom, codec.block_size, p), p)
        elif sfx == "_codes" and four and per_row % 2:
            offset = geom.offset if geom is not None else 0
            n = geom.numel if geom is not None else p.numel()
            codes = quant.unpack_4bit(value, offset % 2 + n)[offset % 2:]
            out[key[:-len(sfx)] + UNPACKED] = _sharded(codes.view(local_rows, per_row), p, (rows, per_row))
        elif sfx == "_codes" and four:
            out[key] = _sharded(value.view(local_rows, per_row // 2), p, (rows, per_row // 2))
        else:
            shape = (rows, *p.shape[1:]) if p.ndim else (1,)
            out[key] = _sharded(value.view(local_rows, *p.shape[1:]) if p.ndim else value, p, shape)
    return out


def _full_absmax(local: Tensor, geom: shards.ShardGeometry | None, block_size: int, p: Tensor) -> Tensor:
    """All global blocks' absmax from every rank's overlapping blocks (one all-gather of a few floats per block)."""
    if geom is None:
        return local
    import torch.distributed as dist

    width = max(quant.n_blocks(b - a, block_size) + 1 for a, b in geom.ranges)
    padded = torch.zeros(width, dtype=local.dtype)
    padded[:local.numel()] = local
    parts = [torch.empty_like(padded) for _ in geom.ranges]
    dist.all_gather(parts, padded, group=geom.group)
    full = torch.zeros(quant.n_blocks(geom.total, block_size), dtype=local.dtype)
    for (a, b), part in zip(geom.ranges, parts):
        span = _block_span(a, b - a, block_size)
        full[span] = part[:span.stop - span.start]
    return full


def _block_span(offset: int, n: int, block_size: int) -> slice:
    """The global blocks that values [offset, offset + n) overlap (empty for n = 0)."""
    first = offset // block_size
    return slice(first, (offset + n - 1) // block_size + 1 if n else first)


def template(opt: Any, p: Tensor, group: dict[str, Any], saved: dict[str, tuple[tuple[int, ...], torch.dtype]]
             ) -> dict[str, Tensor]:
    """Empty tensors in the logical layout for the saved keys of ``p`` (``saved``: key -> (global shape, dtype)),
    for DCP to load into: per-element moments sharded like ``p``, absmax split evenly, the rest replicated."""
    keys = moment_keys(opt, p, group)
    out = {}
    for key, (shape, dtype) in saved.items():
        base = key[:-len(UNPACKED)] + "_codes" if key.endswith(UNPACKED) else key
        if base not in keys or not hasattr(p, "to_local"):
            out[key] = torch.empty(shape, dtype=dtype)
        elif keys[base][0] == "_absmax":
            out[key] = _even_chunk(torch.empty(shape, dtype=dtype), p)
        else:
            geom = shards.geometry(p)
            per_row = _rows(p)[1]
            local_rows = geom.numel // per_row if per_row else 0
            out[key] = _sharded(torch.empty((local_rows, *shape[1:]), dtype=dtype), p, shape)
    return out


def from_logical(opt: Any, p: Tensor, group: dict[str, Any], loaded: dict[str, Tensor]) -> dict[str, Tensor]:
    """The run-time state of ``p`` on this rank from its logical state (a collective under FSDP2)."""
    keys = moment_keys(opt, p, group)
    geom = _geometry(p) if keys else None
    offset = geom.offset if geom is not None else 0
    n = geom.numel if geom is not None else p.numel()
    out: dict[str, Tensor] = {}
    for key, value in loaded.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if key.endswith(UNPACKED):
            codes = local.reshape(-1).to(torch.uint8)
            pad = codes.new_zeros(offset % 2)
            out[key[:-len(UNPACKED)] + "_codes"] = quant.pack_4bit(torch.cat([pad, codes]))
        elif key in keys and keys[key][0] == "_absmax":
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[key] = full[_block_span(offset, n, keys[key][1].block_size)].clone()
        elif key in keys:
            out[key] = local.reshape(-1).clone()
        else:
            out[key] = local.clone() if isinstance(local, Tensor) else local
    return out


def localize_full(opt: Any, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A one-process state (flat, whole tensor) cut to this rank's shard of ``p`` (resuming 1 -> N processes)."""
    keys = moment_keys(opt, p, group)
    geom = _geometry(p) if keys else None
    if geom is None:
        return state
    o, n = geom.offset, geom.numel
    out = {}
    for key, value in state.items():
        if key not in keys:
            out[key] = value
            continue
        sfx, codec = keys[key]
        if sfx == "_absmax":
            out[key] = value[_block_span(o, n, codec.block_size)].clone()
        elif sfx == "_codes" and codec.bits == 4:
            out[key] = value[o // 2:(o + n - 1) // 2 + 1].clone() if n else value[:0].clone()  # global pairs
        else:
            out[key] = value[o:o + n].clone()
    return out
