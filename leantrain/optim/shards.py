"""Where an FSDP2 shard sits in its global tensor, so that block-wise optimizer state follows *global* blocks.

FSDP2 shards every parameter on dim 0 with ``torch.chunk`` semantics: rank r holds rows [r*c, (r+1)*c) with
c = ceil(rows / world), so its values are one contiguous range [offset, offset + numel) of the flattened global
tensor. Block-wise quantization (8/4-bit states) splits the *flattened global* tensor into blocks of
``block_size`` values, as one process does; a block that straddles two shards is then partly on each rank. Its
absmax is the max over all parts, so once per step every rank contributes the partial maxima of its first and
last block (one small all-gather per tensor) and all ranks store identical scales -- and identical codes -- for
1, 2 or 4 processes. Whether a tensor gets quantized state at all is decided from its global size (the caller's
job: ``p.numel()`` of a DTensor is global).

Only Shard(0) on a 1-D mesh (plain FSDP2) is handled; any other layout returns None and the caller keeps the
shard-local layout (documented in docs/distributed.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ShardGeometry:
    """This rank's slice of a global tensor, flattened: values [offset, offset + numel) of ``total``."""

    offset: int
    numel: int
    total: int
    ranges: tuple[tuple[int, int], ...]  # (start, stop) of every rank, in rank order
    group: Any  # the process group of the mesh

    def pieces(self, block_size: int) -> tuple[int, int]:
        """(h, t): local values [0, h) and [t, numel) lie in blocks shared with other ranks, [h, t) in whole local
        blocks. A shard inside one shared block gives (numel, numel)."""
        b, o, n = block_size, self.offset, self.numel
        if n == 0:
            return 0, 0
        first, last = o // b * b, (o + n - 1) // b * b
        first_shared = first < o or min(first + b, self.total) > o + n
        last_shared = last < o or min(last + b, self.total) > o + n
        if first == last:
            return (n, n) if first_shared else (0, n)
        return (first + b - o if first_shared else 0), (last - o if last_shared else n)


def any_shared(geom: ShardGeometry, block_size: int) -> bool:
    """Whether some rank's shard shares a block with another (then every rank joins the exchange)."""
    return any(_block_ids(r, geom.total, block_size) != (-1, -1) for r in geom.ranges)


def rows_split(rows: int, world: int) -> list[tuple[int, int]]:
    """torch.chunk's row ranges of every rank (the last ranks may be empty)."""
    c = -(-rows // world) if rows else 0
    return [(min(r * c, rows), min((r + 1) * c, rows)) for r in range(world)]


def geometry(p: Tensor) -> ShardGeometry | None:
    """The shard geometry of an FSDP2 parameter (DTensor, Shard(0), 1-D mesh); None for anything else."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None or mesh.ndim != 1 or not p.placements[0].is_shard(0) or p.ndim == 0:
        return None
    rows = p.shape[0]
    per_row = p.numel() // rows if rows else 0
    ranges = tuple((a * per_row, b * per_row) for a, b in rows_split(rows, mesh.size()))
    start, stop = ranges[mesh.get_local_rank()]
    return ShardGeometry(start, stop - start, p.numel(), ranges, mesh.get_group())


def _block_ids(geom_range: tuple[int, int], total: int, block_size: int) -> tuple[int, int]:
    """Ids of the shared first and last block of one rank's range (-1 where that end is not shared)."""
    o, stop = geom_range
    g = ShardGeometry(o, stop - o, total, (), None)
    h, t = g.pieces(block_size)
    first = o // block_size if h > 0 else -1
    last = (stop - 1) // block_size if t < g.numel and (stop - 1) // block_size != first else -1
    return first, last


def shared_block_absmax(geom: ShardGeometry, block_size: int, head: list[Tensor], tail: list[Tensor]
                        ) -> tuple[list[float], list[float]]:
    """Global absmax of this rank's shared first and last block, for each moment (one all-gather).

    ``head[i]`` / ``tail[i]``: moment i's new values in the shared first / last block on this rank (empty if that
    end is not shared). Every rank of the mesh must call this for the same tensor."""
    import torch.distributed as dist

    k = len(head)
    mine = torch.tensor([_part_max(x) for x in head] + [_part_max(x) for x in tail], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in geom.ranges]
    dist.all_gather(parts, mine, group=geom.group)
    best: dict[int, list[float]] = {}
    for rng, part in zip(geom.ranges, parts):
        ids = _block_ids(rng, geom.total, block_size)
        for end, block in enumerate(ids):
            if block < 0:
                continue
            vals = part[end * k:(end + 1) * k].tolist()
            prev = best.get(block)
            best[block] = vals if prev is None else [max(a, b) for a, b in zip(prev, vals)]
    first, last = _block_ids((geom.offset, geom.offset + geom.numel), geom.total, block_size)
    zeros = [0.0] * k
    return best.get(first, zeros), best.get(last, zeros)


def _part_max(x: Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0
