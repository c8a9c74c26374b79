"""GaLore optimizers: AdamW whose 2-D parameters keep their moments in a low-rank gradient subspace
(Zhao et al., ICML 2024, arXiv 2403.03507).

These are thin classes over leantrain's ``AdamW`` / ``AdamW8bit`` / ``AdamW4bit`` (adam.py): the optimizer core
already calls ``projector.project`` / ``project_back`` for every 2-D parameter of a group whose ``rank`` is set, so
"8-bit GaLore" is just the 8-bit codec under the same hook. What these classes add is galore-torch's interface:

* ``GaLoreAdamW(model.parameters(), rank=128)`` projects every 2-D parameter (defaults carry the GaLore keys);
* galore-torch's param groups work unchanged: if *any* group has a ``rank`` key, groups without one are dense
  (``[{"params": regular}, {"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25,
  "proj_type": "std"}]``), and each group may override ``update_proj_gap``, ``scale``, ``proj_type``, ``svd``,
  ``seed``, ``refresh_moments``;
* galore-torch's defaults (``eps=1e-6``, ``weight_decay=0``); ``svd`` defaults to "randomized" (seeded range
  finder, ~50x faster refresh than galore-torch's full SVD; pass ``svd="full"`` for the paper's behaviour).

Moments at a refresh: ``refresh_moments="keep"`` (default, as galore-torch) reuses the low-rank moments unchanged
although the basis changed; ``"reproject"`` rotates them into the new basis first (exact for the first moment,
element-wise squared rotation for the second -- see ``projector.rotate_moments``).

eps: galore-torch's fp32 AdamW (like HF's) adds eps to ``sqrt(v)`` *before* bias correction, torch and
bitsandbytes add it to ``sqrt(v_hat)``; early in training, for small gradients, that changes the step by up to
~30 %. ``GaLoreAdamW`` follows galore-torch (``eps_convention="galore"``), the 8/4-bit classes follow bitsandbytes
(``"torch"``, as galore-torch's 8-bit class does); the keyword selects either. The one remaining difference from
galore-torch is O(lr^2 * wd): decoupled weight decay is applied before the update instead of after it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import qgalore
from .adam import AdamW, AdamW4bit, AdamW8bit, adam_builder
from .projector import GROUP_DEFAULTS
from .spec import Builder, OptimizerOptions, OptimizerSpec, register

GALORE_KEYS = ("rank", *GROUP_DEFAULTS, "eps_convention")
EPS_CONVENTIONS = ("galore", "torch")


def _galore_groups(params: Iterable) -> Any:
    """galore-torch's rule: when some group names a ``rank``, the groups that do not are dense."""
    params = list(params)
    if params and all(isinstance(g, dict) for g in params) and any("rank" in g for g in params):
        return [g if "rank" in g else {**g, "rank": None} for g in params]
    return params


class _GaLoreMixin:
    eps_convention = "galore"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: int | None = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std", svd: str = "randomized",
                 seed: int = 0, oversample: int = 8, power_iters: int = 2, refresh_moments: str = "keep",
                 eps_convention: str | None = None, correct_bias: bool = True, no_deprecation_warning: bool = True,
                 **kwargs: Any) -> None:
        eps_convention = eps_convention or self.eps_convention
        if eps_convention not in EPS_CONVENTIONS:
            raise ValueError(f"{type(self).__name__}: unknown eps_convention={eps_convention!r}; "
                             f"choose one of {', '.join(EPS_CONVENTIONS)}")
        if correct_bias is not True:
            raise ValueError(f"{type(self).__name__}: correct_bias={correct_bias!r} is not supported "
                             "(the Adam core always corrects the bias)")
        super().__init__(_galore_groups(params), lr, betas, eps, weight_decay, **kwargs)
        galore = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type,
                  "svd": svd, "seed": seed, "oversample": oversample, "power_iters": power_iters,
                  "refresh_moments": refresh_moments, "eps_convention": eps_convention}
        # Set the GaLore defaults after construction so every group gets them even though the core's
        # ``defaults`` dict was built by the parent; then re-check each group with its final keys.
        self.defaults.update(galore)
        for i, group in enumerate(self.param_groups):
            for key, value in galore.items():
                group.setdefault(key, value)
            self._check(group, f"param group {i}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups added later (and during __init__) receive the GaLore defaults before the core checks them.
        if getattr(self, "defaults", None) and "rank" in self.defaults:
            for key in GALORE_KEYS:
                if key in self.defaults:
                    param_group.setdefault(key, self.defaults[key])
        super().add_param_group(param_group)
        conv = self.param_groups[-1].get("eps_convention")
        if conv is not None and conv not in EPS_CONVENTIONS:
            raise ValueError(f"{type(self).__name__}: unknown eps_convention={conv!r} in param group "
                             f"{len(self.param_groups) - 1}; choose one of {', '.join(EPS_CONVENTIONS)}")

    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        if group.get("eps_convention", "torch") != "galore":
            return super()._rule(g, bufs, group, t)
        m, v = bufs  # galore-torch: step = lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        b1, b2 = group["betas"]
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = v.sqrt().add_(group["eps"])
        return torch.div(m, denom, out=denom), math.sqrt(1.0 - b2**t) / (1.0 - b1**t)


class GaLoreAdamW(_GaLoreMixin, AdamW):
    """GaLore with fp32 low-rank moments (galore-torch's ``GaLoreAdamW``)."""


class GaLoreAdamW8bit(_GaLoreMixin, AdamW8bit):
    """GaLore with 8-bit block-wise low-rank moments ("8-bit GaLore"; moments under ``min_8bit_size`` stay fp32)."""

    eps_convention = "torch"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)  # galore-torch's 8-bit defaults


class GaLoreAdamW4bit(_GaLoreMixin, AdamW4bit):
    """GaLore with 4-bit low-rank moments."""

    eps_convention = "torch"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


# ---- registry: --optim galore-adamw[8bit|4bit] = the plain Adam classes over GaLore-tagged groups --------------
def galore_groups(groups: list[dict], opts: OptimizerOptions) -> list[dict]:
    """Tag the method's ``linear`` groups (or all non-head groups) with GaLore keys; others stay dense.

    Only 2-D parameters whose smaller side exceeds the rank are projected (a rank >= min(m, n) saves nothing);
    "lowrank" groups (DLRT factors) are already low-rank and follow their own integrator."""
    tagged = []
    for g in groups:
        g = dict(g)
        wants = g.get("name") == "linear" or (g.get("name") not in ("head", "other", "lowrank")
                                              and g.get("rank") is None)
        if not wants or g.get("rank") is not None:
            tagged.append(g)
            continue
        fits = [p.ndim == 2 and min(p.shape) > opts.rank for p in g["params"]]
        mats = [p for p, f in zip(g["params"], fits) if f]
        rest = [p for p, f in zip(g["params"], fits) if not f]
        if mats:
            tagged.append({**g, "params": mats, "rank": opts.rank, "update_proj_gap": opts.gap,
                           "scale": opts.proj_scale, "proj_type": "std", "svd": opts.svd,
                           **qgalore.group_keys(opts)})
        if rest:
            tagged.append({**g, "params": rest})
    return tagged


def _galore_builder(cls: type) -> Builder:
    inner = adam_builder(cls)

    def build(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
        return inner(galore_groups(groups, opts), opts, lr)

    return build


PROJECTION_OPTIONS = ("rank", "gap", "proj_scale", "svd")
# The optimizers that take a low-rank gradient computed inside backward (--galore-in-backward, galore_backward.py):
# plain Adam over GaLore groups, which uses nothing of the gradient but its coordinates in the basis.
IN_BACKWARD = ("galore-adamw", "galore-adamw8bit", "galore-adamw4bit")
# Default lr vs AdamW's: causal-lm 10/3, measured on tiny-LLaMA pre-training (60 steps, best of {3e-3, 1e-2} is
# 1e-2; docs/optimizers2.md; the GaLore paper pre-trains at 1e-2 vs AdamW's 1e-3). classify: 1 -- on full
# fine-tuning the projected update (x --proj-scale 0.25) wants ~4-5x (main job: best 1e-3 vs AdamW's 2e-4,
# docs/projected.md), but the main job's default method is LoRA, whose rank-r factors are never projected
# (min side = rank), so a classify scale would only raise the lr of plain AdamW there.
GALORE_LR_SCALE = {"causal-lm": 10 / 3}
register(OptimizerSpec("galore-adamw", _galore_builder(AdamW), states=2, codec="fp32", projected=True,
                       low_rank_accumulation=True, summary="GaLore: AdamW with fp32 moments in a rank-r gradient subspace (--rank, --gap)",
                       options=PROJECTION_OPTIONS, lr_scale=GALORE_LR_SCALE))
register(OptimizerSpec("galore-adamw8bit", _galore_builder(AdamW8bit), states=2, codec="8bit", projected=True,
                       compilable=True, low_rank_accumulation=True, summary="8-bit GaLore: low-rank moments in 8-bit block-wise states",
                       options=(*PROJECTION_OPTIONS, "block_size", "compile_optim"), lr_scale=GALORE_LR_SCALE))
register(OptimizerSpec("galore-adamw4bit", _galore_builder(AdamW4bit), states=2, codec="4bit", projected=True,
                       compilable=True, low_rank_accumulation=True, summary="GaLore with 4-bit low-rank moments",
                       options=(*PROJECTION_OPTIONS, "block_size", "compile_optim"), lr_scale=GALORE_LR_SCALE))
