"""Turn chosen dense nn.Linear / nn.Conv2d layers of any model into DLRT low-rank layers, in place.

From a dense init the factors are the truncated SVD of W (so the converted model starts as close to the dense one
as the kept rank allows); from scratch they are random orthonormal bases with S = diag(sorted |N(0,1)|) as in the
reference code. Paper: Schotthöfer et al. 2022, https://arxiv.org/abs/2205.13571.

Targets follow leantrain's one rule (``leantrain.targets``) over plain ``nn.Linear`` / ``nn.Conv2d`` layers
(exact types: a subclass such as MultiheadAttention's ``out_proj`` is used by its parent and stays dense):
"all-linear" = every nn.Linear except the task head; "all" adds Conv2d; a list or comma-separated string of
names (equal to, or a "." suffix of, the full name; may name a head) or "re:<regex>" (full match, heads left out)
pick among both kinds.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..targets import ALL_LINEAR, of_kind, resolve, set_submodule
from .kls import truncation_rank
from .layers import LowRankConv2d, LowRankLinear, LowRankMixin

Bound = int | Mapping[str, int] | None
DENSE = of_kind(nn.Linear, nn.Conv2d, exact=True)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the dense layers ``targets`` selects (see module docstring); unknown names raise."""
    if targets == "all":
        return resolve(model, ALL_LINEAR, kind=DENSE, what="nn.Linear/nn.Conv2d")
    return resolve(model, targets, kind=DENSE, linear=of_kind(nn.Linear, exact=True), what="nn.Linear/nn.Conv2d")


def _pick(value: Bound, name: str) -> int | None:
    """Per-layer value of an int-or-dict option (None = use the default)."""
    if isinstance(value, Mapping):
        value = value.get(name)
    return value


def _dense_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def make_lowrank(module: nn.Module, name: str = "", rank: int | None = None, *, tau: float | None = None,
                 init: str = "svd", min_rank: int | None = None, max_rank: int | None = None) -> LowRankMixin:
    """A low-rank copy of one dense layer.

    Rank choice: ``rank`` if given; else with ``init="svd"`` and ``tau`` the τ rule applied to σ(W) (the same
    rule the integrator uses, so step 1 does not immediately cut the model); else ``max_rank``.
    ``max_rank`` defaults to min(n, m) // 2 (reference: the augmented basis 2r then fits), raised to ``rank``
    when a larger explicit rank is asked for; ``min_rank`` defaults to 2.
    """
    label = name or type(module).__name__
    if init not in ("svd", "random"):
        raise ValueError(f"{label}: init={init!r} must be 'svd' or 'random'")
    if tau is not None and not tau > 0:
        raise ValueError(f"{label}: tau={tau!r} must be > 0")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"{label}: only groups=1, padding_mode='zeros' convs convert "
                             f"(got groups={module.groups}, padding_mode={module.padding_mode!r})")
    elif not isinstance(module, nn.Linear):
        raise TypeError(f"{label}: cannot convert {type(module).__name__} (nn.Linear or nn.Conv2d only)")
    w = _dense_matrix(module)
    n, m = w.shape
    full = min(n, m)
    if rank is not None and (not isinstance(rank, int) or not 1 <= rank <= full):
        raise ValueError(f"{label}: rank={rank!r} must be an int in [1, {full}] for a {n}x{m} weight")
    hi = max_rank if max_rank is not None else max(1, full // 2)
    if rank is not None:
        hi = max(hi, rank) if max_rank is None else hi
    if not 1 <= hi <= full:
        raise ValueError(f"{label}: max_rank={hi} must be in [1, {full}] for a {n}x{m} weight")
    lo = min(2, hi) if min_rank is None else min(int(min_rank), hi)
    sigma = u = vh = None
    if init == "svd":
        u, sigma, vh = torch.linalg.svd(w.to(torch.float64 if w.dtype == torch.float64 else torch.float32),
                                        full_matrices=False)
    if rank is None:
        rank = truncation_rank(sigma, tau) if (init == "svd" and tau is not None) else hi
    rank = max(lo, min(rank, hi))
    if rank > hi:
        raise ValueError(f"{label}: rank={rank} exceeds max_rank={hi}")
    kw = {"bias": module.bias is not None, "min_rank": lo, "max_rank": hi, "dtype": w.dtype, "device": w.device}
    if isinstance(module, nn.Conv2d):
        new: LowRankMixin = LowRankConv2d(module.in_channels, module.out_channels, module.kernel_size, rank,
                                          module.stride, module.padding, module.dilation, **kw)
    else:
        new = LowRankLinear(module.in_features, module.out_features, rank, **kw)
    if init == "svd":
        new.set_factors(u[:, :rank], torch.diag(sigma[:rank]), vh[:rank].T)
    if module.bias is not None:
        new.bias.data.copy_(module.bias.detach())
    new.train(module.training)
    return new


def convert_to_lowrank(model: nn.Module, targets: str | list[str] = "all-linear", rank: Bound = None, *,
                       tau: float | None = None, init: str = "svd", min_rank: Bound = None,
                       max_rank: Bound = None) -> list[str]:
    """Replace the targeted dense layers of ``model`` in place; returns the converted module names.

    ``rank``, ``min_rank``, ``max_rank`` are an int for every layer or a dict name -> int (missing names use the
    defaults of ``make_lowrank``).
    """
    names = resolve_targets(model, targets)
    for name in names:
        new = make_lowrank(model.get_submodule(name), name, _pick(rank, name), tau=tau, init=init,
                           min_rank=_pick(min_rank, name), max_rank=_pick(max_rank, name))
        set_submodule(model, name, new)
    return names


def model_params(model: nn.Module) -> dict[str, Any]:
    """Inference parameter count of ``model`` (low-rank layers at r(n+m)+r²) and of its dense counterpart."""
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankMixin)}
    own = {id(p) for m in lowrank.values() for p in m.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in own)
    now = rest + sum(m.eval_params() for m in lowrank.values())
    dense = rest + sum(m.dense_params() for m in lowrank.values())
    return {"params": now, "dense_params": dense, "compression": 1.0 - now / dense if dense else 0.0,
            "ranks": {n: m.rank for n, m in lowrank.items()}}
