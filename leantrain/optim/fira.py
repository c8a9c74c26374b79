"""Fira: full-rank training under a low-rank optimizer state.

Paper: X. Chen et al., *Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?*,
https://arxiv.org/abs/2410.01623 (reference implementation ``fira`` 1.0.2). For a matrix W with gradient G and
GaLore's SVD basis P (top-r singular vectors of G, refreshed every ``update_proj_gap`` steps):

    R = P^T G (or G P^T);   M, V = Adam moments of R;   N = M / (sqrt(V) + eps)
    phi_j = ||N_j|| / (||R_j|| + 1e-8)        per channel j of the unprojected side (norm-based scaling)
    S = (G - alpha back(R)) * phi             the residual the low-rank state never sees, scaled like its
                                              projection would be by Adam
    S <- S / (max(||S|| / (gamma_prev + 1e-8), 1.01) / 1.01)   (norm-growth limiter, gamma = ||S||)
    W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * (alpha back(N) + S);   then W <- W - lr * wd * W

So the update is full-rank although only r x n (or m x r) moments are kept. Everything else -- tensors of groups
without ``rank``, 1-D tensors -- is AdamW as in :mod:`apollo` (the same code: Fira is APOLLO's structure with an
SVD basis and the residual term). State: GaLore's ``proj_basis``/``proj_side``/``proj_refreshes``, the low-rank
``exp_avg``/``exp_avg_sq`` in the group's codec, ``limiter_norm``. FSDP2-sharded matrices are refused.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import projector
from .adam import BlockOptimizer
from .apollo import Apollo, apollo_groups
from .spec import OptimizerOptions, OptimizerSpec, register


class Fira(Apollo):
    """Fira with fp32 low-rank moments by default (see the module docstring); ``scale`` is the paper's alpha."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int | None = 128,
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std", svd: str = "full",
                 seed: int = 0, norm_growth_limit: bool = True, block_size: int = 256, min_8bit_size: int = 4096,
                 skip_nonfinite: bool = False, codec: str | None = None) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type, "svd": svd,
                    "seed": seed, "scale_type": "channel", "norm_growth_limit": norm_growth_limit,
                    "block_size": block_size, "min_8bit_size": min_8bit_size, "skip_nonfinite": skip_nonfinite,
                    "codec": codec}
        BlockOptimizer.__init__(self, params, defaults)

    def _check(self, g: dict[str, Any], where: str) -> None:
        super()._check(g, where)
        if g.get("refresh_moments", "keep") not in (None, "keep"):
            raise ValueError(f"{type(self).__name__}: refresh_moments={g['refresh_moments']!r} in {where} is not "
                             "supported (Fira keeps its moments across a basis refresh)")

    def _project(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> Tensor:
        """R in GaLore's SVD basis (projector.py: refreshed at steps 1, T+1, ...)."""
        return projector.project(g, state, group, t)

    def _direction(self, g: Tensor, r: Tensor, normed: Tensor, state: dict[str, Any],
                   group: dict[str, Any]) -> Tensor:
        """alpha back(N) + limiter((G - alpha back(R)) * phi)."""
        phi = self._scaling(normed, r, state["proj_side"], group)
        residual = self._limit((g - projector.project_back(r, state, group)) * phi, state, group)
        return projector.project_back(normed, state, group).add_(residual)


def build_fira(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    """--rank/--gap/--svd on the "linear" matrices (alpha 1, the reference's default); 8-bit codec for every
    moment (the dense head/embedding AdamW moments dominate a small model's state)."""
    return Fira(apollo_groups(groups, opts.rank, opts.gap, 1.0), lr=lr, betas=opts.betas,
                weight_decay=opts.weight_decay, svd=opts.svd, block_size=opts.block_size, codec="8bit")


# Default lr vs AdamW's: causal-lm 10/3, measured on tiny-LLaMA pre-training (60 steps, best of {3e-3, 1e-2} is 1e-2;
# docs/optimizers2.md; the paper pre-trains at 1e-2 like GaLore); classify: 1 (not measured).
register(OptimizerSpec("fira", build_fira, states=2, codec="8bit", projected=True,
                       summary="Fira: GaLore's low-rank Adam state plus the norm-scaled full-rank residual "
                               "(--rank, --gap, --svd); 8-bit states", options=("rank", "gap", "svd", "block_size"),
                       lr_scale={"causal-lm": 10 / 3}))
