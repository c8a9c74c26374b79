"""GaLore's projector (projector.py) on a gradient whose rows are sharded over ranks (FSDP2: Shard(0) on a 1-D mesh).

One job: projector.py's operations in row-sharded form, so that no rank ever holds the whole m x n gradient and
the trajectory still follows one process. Rank i holds the rows ``G_i`` of ``torch.chunk(G, world, dim=0)``
(FSDP2's layout); ``S(.)`` is a sum over ranks (an all-reduce), ``rows(.)`` concatenates every rank's rows (an
all-gather of a matrix with m rows but few columns):

* left projection, P = U_r (m x r):   low = P^T G = S(P_i^T G_i)           r x n all-reduce
                                       back rows_i = P_i low                local
* right projection, P = Vh_r (r x n): low = G P^T = rows(G_i P^T)          m x r all-gather
                                       back rows_i = low_i P                local
* both (``proj_type="full"``):        low = S(U_i^T G_i Vh^T)              r x r all-reduce
                                       back rows_i = U_i low Vh             local

The low-rank gradient -- and so the optimizer moments -- is therefore the same on every rank (replicated, small).

Refresh (randomized range finder, projector.randomized_svd with the same seeded test matrix Omega):
``Y = rows(G_i Omega)`` (m x k), ``Q = qr(Y)``; each power iteration ``Z = qr(S(G_i^T Q_i))`` (n x k) and
``Q = qr(rows(G_i Z))``; then ``B = S(Q_i^T G_i)`` (k x n) and projector.top_singular_of_wide(B). Every QR, eigh
and the final basis is computed on every rank from the same gathered / all-reduced inputs, so the basis is
identical on every rank (bitwise: the collectives deliver the same bytes everywhere and the factorisations are
deterministic). It equals one process's basis up to the rounding of the split sums (~1e-7 relative in fp32).

Signs: QR and eigh fix the sign of each basis vector from their (here: rounding-level different) inputs, so a
sign could in principle differ from one process's if a sign-deciding quantity were ~0. Within one basis that does
not change the update (back(low) = P P^T G is sign-free, and moments accumulated in a flipped coordinate flip
with it); with ``refresh_moments="keep"`` the old moments are reused in the new basis, where a flip relative to
one process *would* change the trajectory -- so the tests compare trajectories over several refreshes, not signs.

Exact SVD refreshes (``svd="full"``, or a matrix whose smaller side is at most ``2 * (rank + oversample)``, where
projector.compute_basis switches to the exact SVD) gather the whole gradient **at the refresh step only** and run
projector.compute_basis on it: the top singular vectors of a row-sharded matrix need every pair of rows to meet
(the Gram matrix G G^T of a wide matrix, or an n x n product as large as G itself for a square one), which is
the whole gradient's worth of communication and memory. The steps between refreshes are sharded as above.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from . import projector, shards
from .projector import BOTH, LEFT, RIGHT


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the rows ``torch.chunk(x, world, dim=0)[rank]`` holds (empty past the last chunk)."""
    return shards.rows_split(rows, world)[rank]


class RowComm:
    """The three collectives the row-sharded math needs, over a ``torch.distributed`` process group.

    ``world``/``rank`` are the rank's place in the group; tests substitute an in-process implementation."""

    def __init__(self, group: Any, world: int, rank: int) -> None:
        self.group, self.world, self.rank = group, world, rank

    @classmethod
    def of(cls, p: Tensor) -> RowComm:
        """The communicator of an FSDP2-sharded parameter (Shard(0) on a 1-D mesh; anything else is refused)."""
        mesh = p.device_mesh
        if mesh.ndim != 1 or not p.placements[0].is_shard(0):
            raise TypeError(f"gradient projection under FSDP2 supports Shard(0) on a 1-D mesh, got {p.placements}")
        return cls(mesh.get_group(), mesh.size(), mesh.get_local_rank())

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over ranks (in place, returned)."""
        import torch.distributed as dist
        dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, local: Tensor, rows: int) -> Tensor:
        """The ``rows`` x c matrix whose torch.chunk row blocks are every rank's ``local`` (same on every rank)."""
        import torch.distributed as dist
        chunk = row_range(rows, self.world, 0)[1]
        padded = local.new_zeros((chunk, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:b - a] for part, (a, b) in
                          zip(parts, (row_range(rows, self.world, i) for i in range(self.world)))])


# ---------------------------------------------------------------------------------------------- bases
def randomized_svd(local: Tensor, shape: tuple[int, int], rank: int, comm: RowComm, *, oversample: int = 8,
                   power_iters: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """projector.randomized_svd of the m x n matrix whose rows ``local`` holds; (U, S, Vh) on every rank.

    Communication: (1 + power_iters) all-gathers of m x k and (1 + power_iters) all-reduces of n x k, with
    k = rank + oversample; never the m x n matrix."""
    dtype = torch.float64 if local.dtype == torch.float64 else torch.float32
    a = local.to(dtype)
    m, n = shape
    start, stop = row_range(m, comm.world, comm.rank)
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=dtype).to(a.device)  # the same draw as projector.py's
    q = torch.linalg.qr(comm.gather_rows(a @ omega, m)).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(comm.all_reduce(a.mT @ q[start:stop])).Q
        q = torch.linalg.qr(comm.gather_rows(a @ z, m)).Q
    b = comm.all_reduce(q[start:stop].mT @ a)  # k x n
    ub, s, vh = projector.top_singular_of_wide(b, rank)
    return q @ ub.to(dtype), s.to(dtype), vh.to(dtype)


def compute_basis(local: Tensor, shape: tuple[int, int], rank: int, side: int, comm: RowComm, *,
                  svd: str = "randomized", seed: int = 0, oversample: int = 8,
                  power_iters: int = 2) -> tuple[Tensor, Tensor | None]:
    """projector.compute_basis of the row-sharded matrix (same return value, on every rank)."""
    rank = min(rank, *shape)
    if svd not in projector.SVD_METHODS:
        raise ValueError(f"unknown svd={svd!r}; choose one of {', '.join(projector.SVD_METHODS)}")
    if projector.uses_exact_svd(shape, rank, svd, oversample):  # see the module docstring: needs the whole G
        return projector.compute_basis(comm.gather_rows(local, shape[0]), rank, side, svd="full", seed=seed,
                                       oversample=oversample, power_iters=power_iters)
    u, _, vh = randomized_svd(local, shape, rank, comm, oversample=oversample, power_iters=power_iters, seed=seed)
    u, vh = u.to(local.dtype).contiguous(), vh.to(local.dtype).contiguous()
    return {RIGHT: (vh, None), LEFT: (u, None)}.get(side, (u, vh))


# ---------------------------------------------------------------------------------------------- projections
def project_with(local: Tensor, shape: tuple[int, int], comm: RowComm, basis: Tensor, side: int,
                 basis_right: Tensor | None = None) -> Tensor:
    """projector.project_with of the row-sharded gradient: the whole low-rank gradient, on every rank."""
    basis, basis_right = projector._as(basis, local.dtype), projector._as(basis_right, local.dtype)
    start, stop = row_range(shape[0], comm.world, comm.rank)
    if side == RIGHT:
        return comm.gather_rows(local @ basis.mT, shape[0])
    if side == LEFT:
        return comm.all_reduce(basis[start:stop].mT @ local)
    return comm.all_reduce(basis[start:stop].mT @ local @ basis_right.mT)


def project(local: Tensor, shape: tuple[int, int], comm: RowComm, state: MutableMapping[str, Any],
            group: Mapping[str, Any], step: int) -> Tensor:
    """projector.project for the rank holding rows ``local`` of an m x n gradient (a collective: every rank of
    ``comm`` calls it for the same parameter at the same step)."""
    start, stop = row_range(shape[0], comm.world, comm.rank)
    if tuple(local.shape) != (stop - start, shape[1]):
        raise ValueError(f"rank {comm.rank} of {comm.world} holds a {tuple(local.shape)} shard of a {shape} "
                         f"gradient; expected rows {start}:{stop} (torch.chunk along dim 0)")
    if projector.needs_refresh(state, group, step):
        side = projector.projection_side(shape, projector.group_option(group, "proj_type"))
        bad = comm.all_reduce(torch.tensor([0.0 if torch.isfinite(local).all() else 1.0], device=local.device))
        if bad.item():
            if not projector.qgalore.has_basis(state):
                raise ValueError(f"cannot compute a projector from a non-finite gradient of shape {shape}")
            warnings.warn(f"GaLore projector: non-finite gradient of shape {shape} at step {step}; "
                          "keeping the previous basis", RuntimeWarning, stacklevel=2)
        else:
            basis, right = compute_basis(local, shape, int(group["rank"]), side, comm,
                                         **projector.basis_options(group, step))
            projector.store_basis(state, group, side, basis, right, step)
    return project_with(local, shape, comm, projector.qgalore.stored_basis(state, group), state["proj_side"],
                        state.get("proj_basis_right"))


def project_back_add_(param: Tensor, shape: tuple[int, int], comm: RowComm, update: Tensor,
                      state: Mapping[str, Any], group: Mapping[str, Any], alpha: float) -> Tensor:
    """``param += alpha * (this rank's rows of project_back(update))`` for the rank's rows ``param`` of an m x n
    parameter; local (no communication), one fused ``addmm_`` as projector.project_back_add_."""
    start, stop = row_range(shape[0], comm.world, comm.rank)
    dtype, side = param.dtype, state["proj_side"]
    basis = projector._as(projector.qgalore.stored_basis(state, group), dtype)
    a = alpha * float(projector.group_option(group, "scale"))
    upd = update.to(dtype)
    if side == RIGHT:
        return param.addmm_(upd[start:stop], basis, alpha=a)
    if side == LEFT:
        return param.addmm_(basis[start:stop], upd, alpha=a)
    return param.addmm_(basis[start:stop] @ upd, projector._as(state["proj_basis_right"], dtype), alpha=a)


def dtensor_project(grad: Tensor, p: Tensor, state: MutableMapping[str, Any], group: Mapping[str, Any],
                    step: int) -> Tensor:
    """``project`` for an FSDP2 parameter ``p`` and its DTensor gradient ``grad`` (the optimizer core's entry)."""
    return project(grad.to_local(), tuple(p.shape), RowComm.of(p), state, group, step)


def dtensor_project_back_add_(p: Tensor, update: Tensor, state: Mapping[str, Any], group: Mapping[str, Any],
                              alpha: float) -> Tensor:
    """``project_back_add_`` into the local shard of an FSDP2 parameter ``p`` (the optimizer core's entry)."""
    return project_back_add_(p.to_local(), tuple(p.shape), RowComm.of(p), update, state, group, alpha)


__all__ = ["BOTH", "LEFT", "RIGHT", "RowComm", "compute_basis", "dtensor_project", "dtensor_project_back_add_",
           "project", "project_back_add_", "project_with", "randomized_svd", "row_range"]
