"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-like updates -- Adam's per-channel (or per-tensor) step size
estimated in a random low-rank projection, applied to the full-rank gradient.

Paper: H. Zhu et al., *APOLLO: SGD-like Memory, AdamW-level Performance*, MLSys 2025, https://arxiv.org/abs/2412.05270
(reference implementation ``apollo-torch`` 1.0.3; its norm-growth limiter is from Fira, arXiv 2410.01623).
For a matrix W (m x n), gradient G, random P with N(0, 1/r) entries (r x n if m >= n, else m x r; drawn from a
seeded CPU generator, redrawn every ``update_proj_gap`` steps, no SVD):

    R = G P^T (or P^T G);   M, V = Adam moments of R (low-rank);   N = M / (sqrt(V) + eps)
    s_j = ||N_j|| / (||R_j|| + 1e-8)  per channel j of the unprojected side (APOLLO), or one s = ||N|| / ||R||
          for the whole tensor (APOLLO-Mini, rank 1)
    U = G * s;   U <- U / (max(||U|| / (gamma_prev + 1e-8), 1.01) / 1.01)   (norm-growth limiter, gamma = ||U||)
    W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * sqrt(alpha) * U;   then W <- W - lr * wd * W

Seeds agree with apollo-torch: parameter k (1-based, over all groups) starts from seed k + ``seed``; after each
draw the seed advances by ``next_seed`` (the 15th int64 of a generator seeded with it).

Which tensors: the 2-D parameters of groups with a ``rank``; the rest (and every tensor of a group without one)
is AdamW with eps added to sqrt(v) before bias correction (apollo-torch's / HF's AdamW), weight decay after the
update. State: ``exp_avg``/``exp_avg_sq`` (low-rank for matrices) through the group's codec; ``proj_basis`` (P,
kept so a step need not redraw it), ``proj_seed``, ``proj_side``, ``limiter_norm``. FSDP2-sharded matrices are
refused (the channel norms and the limiter need the whole gradient).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .adam import BlockOptimizer
from .projector import RIGHT, project_with, projection_side
from .spec import (
    STEP_BYTES,
    OptimizerOptions,
    OptimizerSpec,
    StateBytes,
    StateOptions,
    StateTensor,
    codec_bytes,
    register,
)

SCALE_TYPES = ("channel", "tensor")


def next_seed(seed: int) -> int:
    """The seed of the next random projection (apollo-torch's rule, so both draw the same matrices)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])


def random_basis(shape: tuple[int, int], rank: int, side: int, seed: int) -> Tensor:
    """P with N(0, 1/rank) entries: (rank x n) for a right projection, (m x rank) for a left one."""
    size = (rank, shape[1]) if side == RIGHT else (shape[0], rank)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=gen, dtype=torch.float32) / math.sqrt(rank)


class Apollo(BlockOptimizer):
    """APOLLO (channel-wise scaling); fp32 low-rank moments by default (see the module docstring)."""

    moments = (("exp_avg", True), ("exp_avg_sq", False))
    default_codec = "fp32"
    scale_type = "channel"

    def __init__(self, params: Iterable, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int | None = 256,
                 update_proj_gap: int = 200, scale: float = 1.0, scale_type: str | None = None,
                 norm_growth_limit: bool = True, seed: int = 0, block_size: int = 256, min_8bit_size: int = 4096,
                 skip_nonfinite: bool = False, codec: str | None = None) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": "std",
                    "scale_type": scale_type or self.scale_type, "norm_growth_limit": norm_growth_limit,
                    "seed": seed, "block_size": block_size, "min_8bit_size": min_8bit_size,
                    "skip_nonfinite": skip_nonfinite, "codec": codec}
        super().__init__(params, defaults)

    def _check(self, g: dict[str, Any], where: str) -> None:
        super()._check(g, where)
        if g.get("scale_type", "channel") not in SCALE_TYPES:
            raise ValueError(f"{type(self).__name__}: unknown scale_type={g['scale_type']!r} in {where}; "
                             f"choose one of {', '.join(SCALE_TYPES)}")
        if g.get("proj_type", "std") not in ("std", "left", "right"):
            raise ValueError(f"{type(self).__name__}: proj_type={g['proj_type']!r} in {where} must be std, left "
                             "or right (random projections are one-sided)")

    def _param_seed(self, p: Tensor, group: dict[str, Any]) -> int:
        """1-based position of ``p`` over all groups (apollo-torch's seed) plus the group's ``seed``."""
        params = [q for grp in self.param_groups for q in grp["params"]]
        return next(i for i, q in enumerate(params, 1) if q is p) + int(group.get("seed") or 0)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        if group.get("rank") is not None and p.ndim == 2:
            self._matrix_update(p, group)
            return
        super()._update(p, group)

    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        """AdamW with eps on sqrt(v) before bias correction (apollo-torch's AdamW) for the non-matrix tensors."""
        m, v = bufs
        b1, b2 = group["betas"]
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = v.sqrt().add_(group["eps"])
        return torch.div(m, denom, out=denom), math.sqrt(1.0 - b2**t) / (1.0 - b1**t)

    def _refresh(self, state: dict[str, Any], group: dict[str, Any], shape: tuple[int, int], t: int) -> None:
        """Draw P at step 1 and every ``update_proj_gap`` steps after (apollo-torch: iteration % gap == 0)."""
        if "proj_basis" in state and (t - 1) % group["update_proj_gap"]:
            return
        side = projection_side(shape, group.get("proj_type", "std"))
        rank = min(int(group["rank"]), *shape)
        state["proj_basis"] = random_basis(shape, rank, side, state["proj_seed"])
        state["proj_side"] = side
        state["proj_seed"] = next_seed(state["proj_seed"])

    def _matrix_update(self, p: Tensor, group: dict[str, Any]) -> None:
        """One step of a matrix: Adam moments of the projected gradient R, then the full-rank direction."""
        state, t = self._whole_matrix_step(p, "channel norms need the whole gradient")
        g = p.grad.float()
        r = self._project(p, g, state, group, t)
        n = r.numel()
        codecs = [self._codec(group, n, signed, p) for _, signed in self.moments]
        if not any(f"exp_avg{sfx}" in state for sfx in codecs[0].layout(n)):
            self._init_state(state, group, n, p)
        encs = [self._enc(state, name, c, n) for (name, _), c in zip(self.moments, codecs)]
        m, v = (c.decode_range(e, 0, n).view(r.shape) for c, e in zip(codecs, encs))
        normed, s = self._rule(r, [m, v], group, t)
        for c, e, b in zip(codecs, encs, (m, v)):
            c.encode_range(e, 0, b.reshape(-1))
        self._apply(p, self._direction(g, r, normed, state, group), group, s)

    def _project(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> Tensor:
        """R: the gradient in the current seeded random basis (redrawn when due)."""
        if "proj_seed" not in state:
            state["proj_seed"] = self._param_seed(p, group)
        self._refresh(state, group, tuple(g.shape), t)
        return project_with(g, state["proj_basis"].to(g.device), state["proj_side"])

    def _direction(self, g: Tensor, r: Tensor, normed: Tensor, state: dict[str, Any],
                   group: dict[str, Any]) -> Tensor:
        """sqrt(alpha) * limiter(G * s): the full gradient with Adam's step size estimated in the projection."""
        u = self._limit(g * self._scaling(normed, r, state["proj_side"], group), state, group)
        return u * math.sqrt(group["scale"])

    @staticmethod
    def _scaling(normed: Tensor, r: Tensor, side: int, group: dict[str, Any]) -> Tensor:
        """s = ||N|| / (||R|| + 1e-8), per channel of the unprojected side or for the whole tensor."""
        if group["scale_type"] == "tensor":
            return torch.linalg.vector_norm(normed) / (torch.linalg.vector_norm(r) + 1e-8)
        dim = 1 if side == RIGHT else 0  # right: R is m x r, channels are rows; left: r x n, columns
        s = torch.linalg.vector_norm(normed, dim=dim) / (torch.linalg.vector_norm(r, dim=dim) + 1e-8)
        return s.unsqueeze(1) if side == RIGHT else s

    @staticmethod
    def _limit(u: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """Fira's norm-growth limiter: the update's norm grows by at most 1 % a step."""
        if not group["norm_growth_limit"]:
            return u
        norm = torch.linalg.vector_norm(u)
        if "limiter_norm" in state:
            limiter = torch.clamp(norm / (state["limiter_norm"] + 1e-8), min=1.01) / 1.01
            u = u / limiter
            norm = norm / limiter
        state["limiter_norm"] = norm.reshape(())
        return u

    @staticmethod
    def _apply(p: Tensor, u: Tensor, group: dict[str, Any], s: float) -> None:
        """W <- W - lr s U, then W <- W (1 - lr wd) (apollo-torch's order), in fp32."""
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        w = p.detach() if p.dtype == torch.float32 else p.detach().float()
        w.add_(u, alpha=-lr * s)
        if wd:
            w.add_(w, alpha=-lr * wd)
        if p.dtype != torch.float32:
            p.copy_(w)


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one scaling factor per tensor, alpha = 128 (update scaled by sqrt(128))."""

    scale_type = "tensor"

    def __init__(self, params: Iterable, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int | None = 1, scale: float = 128.0,
                 **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, scale=scale, **kwargs)


# ---- registry ---------------------------------------------------------------------------------------------------
def apollo_groups(groups: list[dict], rank: int, gap: int, scale: float) -> list[dict]:
    """The method's "linear" (and unnamed) groups get the APOLLO keys; head, embeddings/norms ("other") and DLRT
    factors stay AdamW, as in the paper (APOLLO is applied to the attention and MLP matrices)."""
    out = []
    for g in groups:
        matrix = g.get("name") not in ("head", "other", "lowrank")
        out.append({**g, "rank": rank if matrix else None, "update_proj_gap": gap, "scale": scale})
    return out


def _builder(cls: type[Apollo], mini: bool):
    def build(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
        """--rank/--gap for APOLLO (scale 1); APOLLO-Mini: rank 1, scale 128. 8-bit codec for every moment (the
        dense head/embedding AdamW moments dominate a small model's state; low-rank moments under
        ``min_8bit_size`` stay fp32)."""
        rank, scale = (1, 128.0) if mini else (opts.rank, 1.0)
        return cls(apollo_groups(groups, rank, opts.gap, scale), lr=lr, betas=opts.betas,
                   weight_decay=opts.weight_decay, block_size=opts.block_size, codec="8bit")

    return build


def _apollo_state(fixed_rank: int | None) -> StateBytes:
    def count(t: StateTensor, o: StateOptions) -> tuple[int, int]:
        """Estimator: a matrix of an APOLLO group keeps two 8-bit moments of max(m, n) x r values, the limiter's
        norm and the fp32 random basis (min(m, n) x r, the projector bytes); the rest keeps AdamW's two moments.
        r = the registered rank (APOLLO-Mini: 1) capped by the shape."""
        if t.matrix and len(t.shape) == 2:
            r = min(fixed_rank or o.rank, *t.shape)
            return STEP_BYTES + 2 * codec_bytes("8bit", max(t.shape) * r, o.block_size) + 4, min(t.shape) * r * 4
        return STEP_BYTES + 2 * codec_bytes("8bit", math.prod(t.shape), o.block_size), 0

    return count


# Default lr vs AdamW's (docs/optimizers2.md). Tiny-LLaMA pre-training, 60 steps, best of {1e-3 .. 3e-2}: APOLLO
# 1e-2 (the paper pre-trains at 1e-2 vs AdamW's 1e-3), APOLLO-Mini 3e-3 (both AdamW's 3e-3 x scale). Main job
# (LoRA, 120 steps, best of {5e-4, 2e-3, 8e-3} by validation loss): AdamW 2e-3, APOLLO 8e-3 (x4; 0.715 vs 0.777 at
# 2e-3); APOLLO-Mini 8e-3 by a hair (0.744 vs 0.749), so it keeps x1.
register(OptimizerSpec("apollo", _builder(Apollo, False), states=2, codec="8bit", projected=True,
                       state_bytes=_apollo_state(None),
                       summary="APOLLO: channel-wise Adam scaling from a seeded random rank-r projection "
                               "(--rank, --gap); AdamW for head/embeddings; 8-bit states",
                       options=("rank", "gap", "block_size"), lr_scale={"causal-lm": 10 / 3, "classify": 4.0}))
register(OptimizerSpec("apollo-mini", _builder(ApolloMini, True), states=2, codec="8bit", projected=True,
                       state_bytes=_apollo_state(1),
                       summary="APOLLO-Mini: rank-1 random projection, one scaling per tensor (alpha 128); "
                               "8-bit states", options=("gap", "block_size")))
