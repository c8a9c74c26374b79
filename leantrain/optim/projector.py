"""Low-rank gradient projectors (GaLore, arXiv 2403.03507; reused by GradNormLoRP, arXiv 2412.19616).

A 2-D gradient ``G`` (m x n) is replaced by its coordinates ``R`` in an r-dimensional subspace spanned by the
top-r singular vectors of an earlier gradient; the optimizer keeps its moments in R's shape and the update is
mapped back with ``project_back`` (times the scale alpha). The basis is refreshed every ``update_proj_gap``
steps, from a full SVD or from a seeded randomized range finder (Halko, Martinsson & Tropp 2011), which is ~50x
cheaper for r << min(m, n) and gives every process of a distributed run the same basis from the same
all-reduced gradient because its random test matrix comes from a fixed-seed CPU generator.

Sides (``proj_type``):
  * ``std``: tall (m >= n) -> right, ``R = G P^T`` with P (r x n); wide -> left, ``R = P^T G`` with P (m x r),
    so the state lives on the smaller side (galore-torch's default).
  * ``reverse_std`` (the opposite), ``right``, ``left``; ``full`` = two-sided ``U^T G V`` (r x r state).

State (per parameter, plain tensors and numbers only, so ``state_dict()`` round-trips through safetensors):
``proj_basis`` (P, or U for ``full``), ``proj_basis_right`` (V^T, ``full`` only), ``proj_side``
(0 = left, 1 = right, 2 = both), ``proj_refreshes`` (how many bases were computed). Low-rank gradients handed
over before a step (consumed by it, so never in a checkpoint): ``proj_grad_accum``, the micro-batches' sum under
``--layerwise --grad-accum`` (``accumulate``), and ``proj_grad_supplied``, computed by a projecting backward from
the layer's factors (leantrain/galore_backward.py; ``zero_grad`` drops it).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from . import qgalore

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("full", "randomized")
REFRESH_MOMENTS = ("keep", "reproject")
LEFT, RIGHT, BOTH = 0, 1, 2
ACCUM_KEY = "proj_grad_accum"
SIDE_NAMES = {LEFT: "left", RIGHT: "right", BOTH: "both"}
SUPPLIED_GRAD = "proj_grad_supplied"  # state key: a low-rank gradient computed inside backward, not yet stepped

# Defaults of the group keys (galore-torch's names). Used when a group with "rank" omits a key.
GROUP_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd": "randomized",
    "seed": 0,
    "oversample": 8,  # extra random test vectors of the range finder (Halko et al. recommend 5-10)
    "power_iters": 2,  # subspace iterations of the range finder; 2 brings it within ~1 % of exact energy
    "refresh_moments": "keep",  # "keep" = galore-torch; "reproject" = rotate moments into the new basis
}


def group_option(group: Mapping[str, Any], key: str) -> Any:
    """A projector option from the param group, falling back to galore-torch's default."""
    value = group.get(key)
    return GROUP_DEFAULTS[key] if value is None else value


def check_group(group: Mapping[str, Any], where: str = "param group") -> None:
    """Validate the projector keys of a group that has a ``rank``; raise naming the bad key and value."""
    rank = group.get("rank")
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{where}: rank={rank!r} must be a positive int")
    gap = group_option(group, "update_proj_gap")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"{where}: update_proj_gap={gap!r} must be a positive int")
    scale = group_option(group, "scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{where}: scale={scale!r} must be a finite number")
    choices = (("proj_type", PROJ_TYPES), ("svd", SVD_METHODS), ("refresh_moments", REFRESH_MOMENTS))
    for key, allowed in choices:
        value = group_option(group, key)
        if value not in allowed:
            raise ValueError(f"{where}: unknown {key}={value!r}; choose one of {', '.join(allowed)}")
    for key, low in (("oversample", 0), ("power_iters", 0), ("seed", 0)):
        value = group_option(group, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {key}={value!r} must be an int >= {low}")
    qgalore.check(group, where)


def projection_side(shape: tuple[int, ...] | torch.Size, proj_type: str) -> int:
    """LEFT, RIGHT or BOTH for a 2-D shape; ``std`` puts the state on the smaller side."""
    if len(shape) != 2:
        raise ValueError(f"gradient projection needs a 2-D tensor, got shape {tuple(shape)}")
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    if proj_type == "right":
        return RIGHT
    if proj_type == "left":
        return LEFT
    if proj_type == "full":
        return BOTH
    raise ValueError(f"unknown proj_type={proj_type!r}; choose one of {', '.join(PROJ_TYPES)}")


def low_rank_shape(shape: tuple[int, ...] | torch.Size, group: Mapping[str, Any]) -> tuple[int, int]:
    """Shape of the projected gradient (and so of the optimizer moments) for a parameter of ``shape``."""
    m, n = shape
    r = min(int(group["rank"]), m, n)
    side = projection_side(shape, group_option(group, "proj_type"))
    return {LEFT: (r, n), RIGHT: (m, r), BOTH: (r, r)}[side]


def projector_numel(shape: tuple[int, ...] | torch.Size, group: Mapping[str, Any]) -> int:
    """Elements of the stored basis (P is r x n or m x r; both sides for ``full``)."""
    m, n = shape
    r = min(int(group["rank"]), m, n)
    side = projection_side(shape, group_option(group, "proj_type"))
    return {LEFT: m * r, RIGHT: r * n, BOTH: m * r + r * n}[side]


# ---------------------------------------------------------------------------------------------- bases
def _mixed_seed(seed: int, step: int) -> int:
    """A different, reproducible test matrix at every refresh (same on every process)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def randomized_svd(matrix: Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` (U, S, Vh) of ``matrix`` by a randomized range finder with subspace iteration.

    The Gaussian test matrix is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` and then moved,
    so the result is the same on every process and device type for the same input. Computed in float32
    (or float64 if the input is float64).
    """
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    a = matrix.to(dtype)
    m, n = a.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Sketch the range of the smaller product: Y = A @ Omega (m x k).
    omega = torch.randn(n, k, generator=gen, dtype=dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):  # re-orthonormalise after every product (stable subspace iteration)
        z = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ z).Q
    b = q.mT @ a  # k x n
    ub, s, vh = top_singular_of_wide(b, rank)
    return q @ ub.to(dtype), s.to(dtype), vh.to(dtype)


def top_singular_of_wide(b: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` (U, S, Vh) of a wide k x n sketch (k << n) from the eigen-decomposition of its k x k Gram
    matrix, in float64.

    LAPACK's SVD of the whole k x n sketch dominated a projector refresh (4.3x the Gram route for 520 x 5461 on
    this machine; at LLaMA-7B's 1032 x 11008 it made the first refresh of 224 matrices take an hour). The Gram
    matrix squares the condition number, which float64 absorbs for the top singular directions GaLore keeps; Vh
    comes from U^T b re-orthonormalised by QR, so a rank-deficient gradient (rank <= tokens per step) still gets
    orthonormal rows, as an SVD would return for its zero singular values."""
    b64 = b.double()
    lam, vecs = torch.linalg.eigh(b64 @ b64.mT)  # ascending
    ub = vecs.flip(-1)[:, :rank]
    s = lam.flip(-1)[:rank].clamp_min(0).sqrt()
    q, r = torch.linalg.qr((ub.mT @ b64).mT)  # n x rank, columns span the top right singular vectors
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)  # keep Vh's rows aligned with U's columns
    return ub, s, (q * signs).mT


def _full_svd(matrix: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Top-``rank`` (U, Vh) by a full SVD; on non-convergence retry in float64, then with jitter, then
    fall back to the randomized range finder -- each with a warning naming the shape."""
    shape = tuple(matrix.shape)
    try:
        u, _, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        return u[:, :rank], vh[:rank]
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        warnings.warn(f"GaLore projector: float32 SVD of a {shape} gradient failed ({exc}); retrying in float64",
                      RuntimeWarning, stacklevel=3)
    x64 = matrix.double()
    try:
        u, _, vh = torch.linalg.svd(x64, full_matrices=False)
        return u[:, :rank].float(), vh[:rank].float()
    except RuntimeError as exc:
        warnings.warn(f"GaLore projector: float64 SVD of a {shape} gradient failed ({exc}); retrying with jitter",
                      RuntimeWarning, stacklevel=3)
    gen = torch.Generator(device="cpu").manual_seed(_mixed_seed(seed, -1))
    noise = torch.randn(shape, generator=gen, dtype=torch.float64).to(x64.device)
    jitter = 1e-7 * (x64.norm() / math.sqrt(x64.numel()) + 1e-30)
    try:
        u, _, vh = torch.linalg.svd(x64 + jitter * noise, full_matrices=False)
        return u[:, :rank].float(), vh[:rank].float()
    except RuntimeError as exc:
        warnings.warn(f"GaLore projector: SVD of a {shape} gradient failed even with jitter ({exc}); "
                      "using the randomized range finder instead", RuntimeWarning, stacklevel=3)
    u, _, vh = randomized_svd(matrix, rank, seed=seed, power_iters=4)
    return u, vh


def uses_exact_svd(shape: tuple[int, ...] | torch.Size, rank: int, svd: str, oversample: int) -> bool:
    """Whether a refresh takes the exact SVD: asked for (``svd="full"``), or a randomized sketch would be about as
    large as the matrix (smaller side at most ``2 * (rank + oversample)``), where an exact SVD costs the same."""
    return svd == "full" or 2 * (min(rank, *shape) + oversample) >= min(shape)


def compute_basis(grad: Tensor, rank: int, side: int, *, svd: str = "randomized", seed: int = 0,
                  oversample: int = 8, power_iters: int = 2) -> tuple[Tensor, Tensor | None]:
    """Orthonormal basis of the top-``rank`` singular subspace of ``grad`` on ``side``.

    Returns ``(P, None)`` with P = Vh_r (r x n) for RIGHT or P = U_r (m x r) for LEFT, and ``(U_r, Vh_r)``
    for BOTH; cast to ``grad.dtype`` (as galore-torch does). ``svd="randomized"`` on a matrix whose smaller side
    is at most ``2 * (rank + oversample)`` uses the exact SVD instead (same cost, no approximation).
    """
    if grad.ndim != 2:
        raise ValueError(f"gradient projection needs a 2-D tensor, got shape {tuple(grad.shape)}")
    rank = min(rank, *grad.shape)
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd={svd!r}; choose one of {', '.join(SVD_METHODS)}")
    if uses_exact_svd(grad.shape, rank, svd, oversample):
        u, vh = _full_svd(grad, rank, seed)
    else:
        u, _, vh = randomized_svd(grad, rank, oversample=oversample, power_iters=power_iters, seed=seed)
    u, vh = u.to(grad.dtype).contiguous(), vh.to(grad.dtype).contiguous()
    if side == RIGHT:
        return vh, None
    if side == LEFT:
        return u, None
    return u, vh


def _as(basis: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return basis if basis is None or basis.dtype == dtype else basis.to(dtype)


def project_with(grad: Tensor, basis: Tensor, side: int, basis_right: Tensor | None = None) -> Tensor:
    """Coordinates of ``grad`` in the stored basis (pure; computed in ``grad``'s dtype)."""
    basis, basis_right = _as(basis, grad.dtype), _as(basis_right, grad.dtype)
    if side == RIGHT:
        return grad @ basis.mT
    if side == LEFT:
        return basis.mT @ grad
    return basis.mT @ grad @ basis_right.mT


def project_factors(dy: Tensor, x: Tensor, basis: Tensor, side: int, basis_right: Tensor | None = None) -> Tensor:
    """``project_with(dy^T x)`` of a Linear's weight gradient without building the m x n product: for output
    gradients ``dy`` (tokens x m) and inputs ``x`` (tokens x n), right: ``dy^T (x P^T)``, left: ``(dy P)^T x``,
    both: ``(dy U)^T (x Vh^T)`` -- 2 t r (m + n) instead of 2 t m n + 2 m n r multiply-adds. Computed in ``dy``'s
    dtype."""
    basis, basis_right = _as(basis, dy.dtype), _as(basis_right, dy.dtype)
    if side == RIGHT:
        return dy.mT @ (x @ basis.mT)
    if side == LEFT:
        return (dy @ basis).mT @ x
    return (dy @ basis).mT @ (x @ basis_right.mT)


def project_back_with(low: Tensor, basis: Tensor, side: int, basis_right: Tensor | None = None) -> Tensor:
    """Full-shape matrix from low-rank coordinates (pure, no scale; computed in ``low``'s dtype, so an fp32
    update of a bf16 parameter is mapped back in fp32)."""
    basis, basis_right = _as(basis, low.dtype), _as(basis_right, low.dtype)
    if side == RIGHT:
        return low @ basis
    if side == LEFT:
        return basis @ low
    return basis @ low @ basis_right


def captured_energy(grad: Tensor, basis: Tensor, side: int, basis_right: Tensor | None = None) -> float:
    """Share of ``||G||_F^2`` inside the subspace: ``||project(G)||^2 / ||G||^2`` (basis orthonormal)."""
    g = grad.float()
    low = project_with(g, basis.float(), side, None if basis_right is None else basis_right.float())
    return float(low.pow(2).sum() / g.pow(2).sum().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- hook API
def needs_refresh(state: Mapping[str, Any], group: Mapping[str, Any], step: int) -> bool:
    """True on the first call and at steps 1, T+1, 2T+1, ... (galore-torch's schedule, 1-based steps); with
    Q-GaLore's lazy refresh, at the layer's own next refresh step (qgalore.record_refresh)."""
    if not qgalore.has_basis(state):
        return True
    if qgalore.lazy(group):
        return step >= int(state.get("proj_next", 0))
    return (step - 1) % int(group_option(group, "update_proj_gap")) == 0


def rotation(old: Tensor, new: Tensor, side: int) -> Tensor:
    """r x r matrix C taking old low-rank coordinates to new ones (``R_new ~ R_old @ C`` for RIGHT,
    ``C @ R_old`` for LEFT): C = P_old P_new^T (right) or P_new^T P_old (left)."""
    return old @ new.mT if side == RIGHT else new.mT @ old


def rotate_moments(exp_avg: Tensor, exp_avg_sq: Tensor | None, rot: Tensor, side: int) -> tuple[Tensor, Tensor | None]:
    """Re-express Adam moments in a refreshed basis.

    The first moment is linear in the gradient, so it maps exactly: m' = m C (right) / C m (left) -- the
    coordinates of the old full-space momentum ``back(m)`` in the new subspace. The second moment is not
    linear; we map it with the element-wise squared rotation (v' = v (C*C)), which keeps it non-negative, is
    exact when C is a signed permutation and is the usual approximation for a diagonal preconditioner.
    """
    if side == RIGHT:
        m2 = exp_avg @ rot
        v2 = None if exp_avg_sq is None else exp_avg_sq @ (rot * rot)
    else:
        m2 = rot @ exp_avg
        v2 = None if exp_avg_sq is None else (rot * rot) @ exp_avg_sq
    return m2, v2


def project(grad: Tensor, state: MutableMapping[str, Any], group: Mapping[str, Any], step: int) -> Tensor:
    """Low-rank gradient for the optimizer; refreshes the basis in ``state`` when due.

    On a refresh with ``refresh_moments="reproject"``, the r x r change-of-basis matrix is left in
    ``state["proj_rotation"]`` for the optimizer core to apply to its moments (``rotate_moments``) before it
    updates them; with ``"keep"`` (default, like galore-torch) the moments are used unchanged.
    """
    if grad.ndim != 2:
        raise ValueError(f"gradient projection needs a 2-D tensor, got shape {tuple(grad.shape)}")
    accumulated = state.pop(ACCUM_KEY, None)
    if accumulated is not None:  # summed by ``accumulate``, whose first call refreshed the basis if due
        return accumulated
    if needs_refresh(state, group, step):
        side = projection_side(grad.shape, group_option(group, "proj_type"))
        if not torch.isfinite(grad).all():
            if not qgalore.has_basis(state):
                raise ValueError(f"cannot compute a projector from a non-finite gradient of shape {tuple(grad.shape)}")
            warnings.warn(f"GaLore projector: non-finite gradient of shape {tuple(grad.shape)} at step {step}; "
                          "keeping the previous basis", RuntimeWarning, stacklevel=2)
        else:
            basis, right = compute_basis(grad, int(group["rank"]), side, **basis_options(group, step))
            store_basis(state, group, side, basis, right, step)
    return project_with(grad, *current_basis(state, group))


def current_basis(state: Mapping[str, Any], group: Mapping[str, Any]) -> tuple[Tensor, int, Tensor | None]:
    """(basis, side, right basis) as ``project_with`` takes them: the stored basis, dequantized when Q-GaLore's
    ``proj_bits`` keeps it as codes."""
    return qgalore.stored_basis(state, group), state["proj_side"], state.get("proj_basis_right")


def accumulate(grad: Tensor, state: MutableMapping[str, Any], group: Mapping[str, Any], step: int) -> Tensor:
    """Add ``grad``'s low-rank coordinates to the accumulator of the coming ``step`` and return it; the next
    ``project`` returns the sum instead of projecting its own gradient.

    Gradient accumulation in r x n per matrix instead of m x n (``--layerwise --grad-accum``: the full gradient of
    the whole batch never exists). Between refreshes the sum equals the projection of the summed gradient (the
    projection is linear). At a refresh step the basis is computed from the *first* micro-batch's gradient, the
    only one available before projecting -- the one difference from ordinary accumulation. Projections are
    computed in fp32 and summed in the gradient's dtype, as ordinary accumulation sums in ``p.grad``."""
    acc = state.get(ACCUM_KEY)
    g = grad.float()
    if acc is None:
        state[ACCUM_KEY] = project(g, state, group, step).to(grad.dtype)
        return state[ACCUM_KEY]
    return acc.add_(project_with(g, *current_basis(state, group)))


def drop_accumulated(state: MutableMapping[str, Any]) -> None:
    """Forget a half-accumulated low-rank gradient (a skipped update)."""
    state.pop(ACCUM_KEY, None)


def basis_options(group: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The keyword arguments of ``compute_basis`` for a refresh of ``group`` at ``step`` (seed mixed with step)."""
    return {"svd": group_option(group, "svd"), "seed": _mixed_seed(int(group_option(group, "seed")), step),
            "oversample": int(group_option(group, "oversample")),
            "power_iters": int(group_option(group, "power_iters"))}


def store_basis(state: MutableMapping[str, Any], group: Mapping[str, Any], side: int, basis: Tensor,
                right: Tensor | None, step: int | None = None) -> None:
    """Record a refreshed basis in ``state`` (and the moment rotation when ``refresh_moments="reproject"``);
    Q-GaLore's options (qgalore.py): quantized storage, the lazy-refresh bookkeeping of the refresh at ``step``."""
    old = qgalore.stored_basis(state, group) if qgalore.has_basis(state) else None
    if (group_option(group, "refresh_moments") == "reproject" and old is not None and side != BOTH
            and old.shape == basis.shape):
        state["proj_rotation"] = rotation(old, basis, side)
    if side == BOTH:
        state["proj_basis"] = basis
    else:
        qgalore.keep_basis(state, group, basis)
    if qgalore.lazy(group) and step is not None and side != BOTH:
        qgalore.record_refresh(state, group, basis, side, step)
    if right is not None:
        state["proj_basis_right"] = right
    state["proj_side"] = side
    state["proj_refreshes"] = int(state.get("proj_refreshes", 0)) + 1


def project_supplied(grad: Tensor | None, low: Tensor, state: MutableMapping[str, Any], group: Mapping[str, Any],
                     step: int) -> Tensor:
    """The low-rank gradient when a projecting backward supplied ``low`` in the current basis; a full gradient
    ``grad`` from other uses of the same weight (if any) is projected and added (projection is linear)."""
    if needs_refresh(state, group, step):
        raise RuntimeError(f"GaLore: a low-rank gradient of shape {tuple(low.shape)} was supplied for refresh step "
                           f"{step}, whose basis does not exist yet (the backward must build the full gradient)")
    if grad is None:
        return low
    return project_with(grad, *current_basis(state, group)).add_(low)


def project_back(update: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """Full-shape update ``back(N) * scale`` from the low-rank one."""
    full = project_back_with(update, qgalore.stored_basis(state, group), state["proj_side"],
                             state.get("proj_basis_right"))
    return full.mul_(float(group_option(group, "scale")))


def project_back_add_(param: Tensor, update: Tensor, state: Mapping[str, Any], group: Mapping[str, Any],
                      alpha: float) -> Tensor:
    """``param += alpha * project_back(update)`` without a full-size temporary (one fused ``addmm_``)."""
    dtype = param.dtype
    basis, side = _as(qgalore.stored_basis(state, group), dtype), state["proj_side"]
    a = alpha * float(group_option(group, "scale"))
    upd = update.to(dtype)
    if side == RIGHT:
        return param.addmm_(upd, basis, alpha=a)
    if side == LEFT:
        return param.addmm_(basis, upd, alpha=a)
    return param.addmm_(basis @ upd, _as(state["proj_basis_right"], dtype), alpha=a)
