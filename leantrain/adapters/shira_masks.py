"""SHiRA mask functions: which K entries of a weight matrix train.

Paper: Bhardwaj et al., *Sparse High Rank Adapters*, NeurIPS 2024, https://arxiv.org/abs/2406.13175 (Sec. 3:
SHiRA-Rand, SHiRA-WM, SHiRA-Grad, SHiRA-SNIP). PEFT sizes the mask like a LoRA of rank r: ``K = r * (out + in)``.

Every function here is pure (tensors in, tensors out) and returns the selected positions as a **sorted 1-D int64
tensor of flat row-major indices** (``row * in_features + col``). Sorted flat indices are what the adapter stores:
they give PEFT's ``(2, K)`` row/col layout in ``torch.where`` order, a CSR row pointer, and a cheap uniqueness check.

Speed matters (a 24-layer 2048x2048 model must get its masks in well under a second; PEFT's ``randperm`` of all
``out*in`` positions takes ~0.1-0.2 s per layer on CPU), so:
  * random: draw ~1.05 K positions with replacement, de-duplicate (one sort), drop a random subset of the surplus --
    by symmetry the result is a uniformly random K-subset; ``randperm`` is used only for dense masks (K > N/4);
  * top-K by score: estimate the K-th largest score from a random sample, keep every entry above a slightly lower
    threshold (a superset of the exact top K) and run ``topk`` on that small candidate set; if the estimate was
    too high we fall back to a full ``topk``. The result is the exact top-K set (ties broken arbitrarily).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

MASK_KINDS = ("random", "magnitude", "gradient", "snip")
# A custom mask: fn(weight, k, *, seed, grad) -> 0/1 mask of weight's shape, flat indices (K,) or row/col (2, K).
MaskFn = Callable[..., torch.Tensor]

_SAMPLE = 65_536  # scores sampled to estimate the top-K threshold
_SLACK = 1.3  # keep ~30% more candidates than K so the sampled threshold almost never undershoots


def shira_count(out_features: int, in_features: int, r: int | None = None, fraction: float | None = None) -> int:
    """Number of trainable entries K: ``int(fraction * out * in)`` (>= 1) if fraction is given, else ``r*(out+in)``."""
    total = out_features * in_features
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"SHiRA fraction={fraction!r} must be in (0, 1]")
        k = max(1, int(fraction * total))  # int(): the same count as leantrain.memory.estimate
    else:
        if r is None or r <= 0:
            raise ValueError(f"SHiRA r={r!r} must be a positive integer")
        k = r * (out_features + in_features)
    if k > total:
        raise ValueError(
            f"SHiRA r={r} gives K={k} trainable entries but the {out_features}x{in_features} weight has only {total}"
        )
    return k


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()  # CPU generator: masks are identical on CPU and CUDA for the same seed
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)
    return g


def random_mask(shape: tuple[int, int], k: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """K distinct flat positions of an ``out x in`` matrix, uniformly at random; deterministic given ``seed``."""
    n = shape[0] * shape[1]
    _check_k(k, n)
    g = _generator(seed)
    if 4 * k > n:  # dense mask: a full permutation is as cheap as rejection
        flat = torch.randperm(n, generator=g)[:k]
    else:
        distinct = _sorted_distinct(torch.randint(0, n, (k + k // 20 + 16,), generator=g))
        while distinct.numel() < k:  # rare: too many collisions, draw more
            extra = torch.randint(0, n, (k - distinct.numel() + k // 20 + 16,), generator=g)
            distinct = _sorted_distinct(torch.cat([distinct, extra]))
        extra = distinct.numel() - k
        if extra == 0:
            return distinct.to(device)
        # drop a random subset of the surplus: the rest stays sorted and is a uniform K-subset
        keep = torch.ones(distinct.numel(), dtype=torch.bool)
        keep[torch.randperm(distinct.numel(), generator=g)[:extra]] = False
        return distinct[keep].to(device)
    return flat.sort().values.to(device)


def topk_flat(scores: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Sorted flat indices of the K largest entries of ``scores`` (any shape), exact, without a full-size topk."""
    flat_scores = scores.detach().reshape(-1)
    n = flat_scores.numel()
    _check_k(k, n)
    if not torch.isfinite(flat_scores).all():
        raise ValueError("SHiRA mask scores contain NaN or inf")
    if n <= 4 * _SAMPLE or 4 * k > n:
        return torch.topk(flat_scores, k, sorted=False).indices.sort().values
    g = _generator(seed)
    sample = flat_scores[torch.randint(0, n, (_SAMPLE,), generator=g).to(flat_scores.device)]
    keep = min(_SAMPLE, max(1, int(_SAMPLE * k / n * _SLACK) + 1))
    threshold = torch.kthvalue(sample, _SAMPLE - keep + 1).values  # keep-th largest of the sample
    candidates = (flat_scores >= threshold).nonzero().squeeze(1)
    if candidates.numel() < k:  # the sample over-estimated the threshold: exact fallback
        return torch.topk(flat_scores, k, sorted=False).indices.sort().values
    best = torch.topk(flat_scores[candidates], k, sorted=False).indices
    return candidates[best].sort().values


def magnitude_mask(weight: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """SHiRA-WM: the K entries with the largest |W|."""
    return topk_flat(weight.detach().abs(), k, seed)


def gradient_mask(grad: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """SHiRA-Grad: the K entries with the largest accumulated gradient magnitude (``grad`` = sum of |dL/dW|)."""
    return topk_flat(grad.abs(), k, seed)


def snip_mask(weight: torch.Tensor, grad: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """SHiRA-SNIP: the K entries with the largest |W * dL/dW| (connection saliency, Lee et al. 2019)."""
    if weight.shape != grad.shape:
        raise ValueError(f"SNIP mask: weight shape {tuple(weight.shape)} != gradient shape {tuple(grad.shape)}")
    return topk_flat((weight.detach().float() * grad.float()).abs(), k, seed)


def make_mask(kind: str | MaskFn, weight: torch.Tensor, k: int, seed: int = 0,
              grad: torch.Tensor | None = None, where: str = "layer") -> torch.Tensor:
    """Dispatch on the mask kind (or call a custom function) and return validated sorted flat indices."""
    shape = (weight.shape[0], weight.shape[1])
    if callable(kind):
        return as_flat_indices(kind(weight, k, seed=seed, grad=grad), shape, k, where)
    if kind == "random":
        return random_mask(shape, k, seed, weight.device)
    if kind == "magnitude":
        return magnitude_mask(weight, k, seed)
    if kind in ("gradient", "snip"):
        if grad is None:
            raise ValueError(f"SHiRA mask {kind!r} for {where} needs gradient scores: pass calib= to inject()")
        return gradient_mask(grad, k, seed) if kind == "gradient" else snip_mask(weight, grad, k, seed)
    raise ValueError(f"unknown SHiRA mask {kind!r}; choose one of {', '.join(MASK_KINDS)} or pass a callable")


def as_flat_indices(mask: torch.Tensor, shape: tuple[int, int], k: int | None = None,
                    where: str = "layer") -> torch.Tensor:
    """Accept a 0/1 mask of ``shape``, flat indices ``(K,)`` or row/col indices ``(2, K)``; validate; sort."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"SHiRA mask for {where} must be a torch.Tensor, got {type(mask).__name__}")
    out_f, in_f = shape
    binary = bool(((mask == 0) | (mask == 1)).all()) if mask.numel() else True
    if tuple(mask.shape) == (out_f, in_f) and (binary or mask.is_floating_point()):
        if not binary:
            raise ValueError(f"SHiRA mask for {where} must contain only 0 and 1")
        flat = mask.reshape(-1).nonzero().squeeze(1)
    elif mask.dim() == 2 and mask.shape[0] == 2 and not mask.is_floating_point():
        flat = indices_to_flat(mask, shape, where)
    elif mask.dim() == 1 and not mask.is_floating_point() and mask.dtype != torch.bool:
        flat = mask.long()
    else:
        raise ValueError(f"SHiRA mask for {where} has shape {tuple(mask.shape)} and dtype {mask.dtype}; expected a "
                         f"0/1 mask of shape {shape}, flat indices (K,) or row/col indices (2, K)")
    flat = flat.sort().values
    if flat.numel() and (flat[0] < 0 or flat[-1] >= out_f * in_f):
        raise ValueError(f"SHiRA mask for {where} has indices outside the {out_f}x{in_f} weight")
    if flat.numel() > 1 and not bool((flat[1:] != flat[:-1]).all()):
        raise ValueError(f"SHiRA mask for {where} has duplicate positions")
    if k is not None and flat.numel() != k:
        raise ValueError(f"SHiRA mask for {where} selects {flat.numel()} entries, expected K={k}")
    return flat


def flat_to_indices(flat: torch.Tensor, in_features: int) -> torch.Tensor:
    """PEFT layout: int32 ``(2, K)``, row 0 = output index, row 1 = input index, in row-major order."""
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


def indices_to_flat(indices: torch.Tensor, shape: tuple[int, int], where: str = "layer") -> torch.Tensor:
    """Inverse of :func:`flat_to_indices`, with a bounds check naming ``where``."""
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ValueError(f"SHiRA indices for {where} must have shape (2, K), got {tuple(indices.shape)}")
    rows, cols = indices.long()
    if rows.numel() and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]):
        raise ValueError(f"SHiRA indices for {where} fall outside the {shape[0]}x{shape[1]} weight")
    return rows * shape[1] + cols


def _sorted_distinct(values: torch.Tensor) -> torch.Tensor:
    # sort + adjacent compare: torch.unique's default CPU path was 20-100x slower here (hash-based)
    s = values.sort().values
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


def _check_k(k: int, n: int) -> None:
    if not 0 < k <= n:
        raise ValueError(f"SHiRA mask size K={k} must be in [1, {n}]")
