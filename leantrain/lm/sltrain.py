"""SLTrain: pre-train every targeted weight as a low-rank plus a fixed-support sparse matrix, W = s B A + S.

Paper: Han et al., *SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining*,
NeurIPS 2024, https://arxiv.org/abs/2406.02214. The support of S (its nonzero positions) is drawn uniformly at
random once, with density delta (paper default 0.03), and never changes; only its values train, together with
B (out x r) and A (r x in). The low-rank part learns the head of the spectrum, the random sparse part the tail,
so W can be full rank at a fraction of the dense parameters. s = alpha / r (LoRA's scaling, --alpha).

Init as the paper's implementation: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, S values ~ U(-1/sqrt(in), 1/sqrt(in));
positions are sorted flat indices (int64 buffer, ``support``), drawn from a generator seeded by --seed, so a
resumed run (or any run with the same seed) has the same support. The forward materialises W for one layer at
a time inside an autograd function that saves only x and the factors and recomputes W in backward, so no
weight-sized tensor stays alive between forward and backward.

Memory-efficient version: the paper's "quantization and per-layer updates" (its 73 % saving at LLaMA 7B) is the
authors' LLaMA-7B recipe -- bitsandbytes ``Adam8bit`` over B, A and the values (8-bit optimizer states; the
factors themselves stay bf16), per-layer weight updates, bf16 weights. Here that is ``--optim adamw8bit
--layerwise --dtype bf16`` with this method unchanged (tested: the layerwise 8-bit step equals the ordinary one).

Registered as ``sltrain`` (causal-LM pre-training only). Option: ``TrainConfig.extra["sltrain_density"]``
(``--extra sltrain_density=0.05``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..methods import Calibration, EstimatorTensor, MethodBase, register
from ..targets import is_head, set_submodule
from .lowrank import factor_groups

DEFAULT_DENSITY = 0.03  # the paper's delta for LLaMA 60M-7B


def density_of(extra: dict[str, Any]) -> float:
    """``sltrain_density`` from TrainConfig.extra, checked to lie in (0, 1)."""
    delta = extra.get("sltrain_density", DEFAULT_DENSITY)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"TrainConfig.extra sltrain_density={delta!r} must be a number in (0, 1)")
    return float(delta)


def support_size(out_f: int, in_f: int, density: float) -> int:
    """Number of sparse entries of an out x in weight: floor(delta * out * in), at least one."""
    return max(1, int(density * out_f * in_f))


def dense_weight(b: torch.Tensor, a: torch.Tensor, values: torch.Tensor, support: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """W = s B A + S with S given by (flat positions ``support``, ``values``)."""
    w = (scale * b) @ a
    return w.flatten().index_add(0, support, values.to(w.dtype)).view_as(w)


class SparseLowRankFunction(torch.autograd.Function):
    """y = x W^T + bias with W = s B A + S built here and rebuilt in backward (only x and factors are saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, values: torch.Tensor,
                support: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, b, a, values, support)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return F.linear(x, dense_weight(b, a, values, support, scale), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, b, a, values, support = ctx.saved_tensors
        scale = ctx.scale
        grad_x = grad @ dense_weight(b, a, values, support, scale) if ctx.needs_input_grad[0] else None
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = g2.T @ x2  # (out, in), transient
        grad_b = scale * (grad_w @ a.T)
        grad_a = scale * (b.T @ grad_w)
        grad_values = grad_w.flatten()[support].to(values.dtype)
        grad_bias = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_b, grad_a, grad_values, None, grad_bias, None


class SparseLowRankLinear(nn.Module):
    """A Linear re-parameterised as s B A + S (see the module docstring); the bias, if any, stays dense."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, density: float, generator: torch.Generator):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if not 0 < rank < min(out_f, in_f):
            raise ValueError(f"sltrain rank {rank} must be in 1..{min(out_f, in_f) - 1} for a {out_f}x{in_f} Linear")
        dtype, device = linear.weight.dtype, linear.weight.device
        bound = 1.0 / math.sqrt(in_f)
        nnz = support_size(out_f, in_f, density)
        support = torch.randperm(out_f * in_f, generator=generator)[:nnz].sort().values
        values = torch.empty(nnz).uniform_(-bound, bound, generator=generator)
        a = torch.empty(rank, in_f).uniform_(-bound, bound, generator=generator)
        self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device))
        self.A = nn.Parameter(a.to(dtype=dtype, device=device))
        self.values = nn.Parameter(values.to(dtype=dtype, device=device))
        self.register_buffer("support", support.to(device))
        self.bias = linear.bias
        self.in_features, self.out_features, self.rank = in_f, out_f, rank
        self.scale, self.density = alpha / rank, density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SparseLowRankFunction.apply(x, self.B, self.A, self.values, self.support, self.bias, self.scale)

    def weight_dense(self) -> torch.Tensor:
        """The dense W this layer applies (for merging into a plain Linear, and for tests)."""
        return dense_weight(self.B, self.A, self.values, self.support, self.scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, density={self.density:g}"


def sparsify_low_rank(model: nn.Module, rank: int, alpha: float, density: float, seed: int) -> list[str]:
    """Replace every non-head nn.Linear larger than ``rank`` (the lowrank baseline's rule) by a
    SparseLowRankLinear; supports and inits are drawn in module order from one generator seeded by ``seed``."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not is_head(n) and min(m.weight.shape) > rank]
    if not names:
        raise ValueError(f"sltrain: no Linear layer is larger than rank {rank}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name in names:
        set_submodule(model, name, SparseLowRankLinear(model.get_submodule(name), rank, alpha, density, generator))
    return names


class SLTrain(MethodBase):
    """``--method sltrain``: B, A and the sparse values train with every non-targeted parameter (embeddings,
    norms, lm_head, biases), as in the paper's pre-training."""

    name = "sltrain"
    default_lr = 1e-3
    summary = "SLTrain: W = B A + S, random fixed-support sparse S, trained from scratch (causal-LM pre-training)"
    trains_base = True
    tasks = ("causal-lm",)
    replaces_targets = True
    options = ("rank", "alpha")  # the TrainConfig fields it reads (others given on the CLI draw a warning)

    def validate(self, cfg: TrainConfig) -> None:
        density_of(cfg.extra)

    def estimator_tensors(self, module: str, out_f: int, in_f: int, opts: Any) -> list[EstimatorTensor]:
        """W (out x in) becomes B (out x r), A (r x in) and delta*out*in sparse values, all trained."""
        nnz = support_size(out_f, in_f, density_of(getattr(opts, "extra", None) or {}))
        return [EstimatorTensor(module + ".B", (out_f, opts.rank), base=True),
                EstimatorTensor(module + ".A", (opts.rank, in_f), base=True),
                EstimatorTensor(module + ".values", (nnz,), base=True)]

    def estimator_extras(self, targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
        """The int64 support of every layer, and the dense W and its gradient that backward rebuilds for one
        layer at a time."""
        density = density_of(getattr(opts, "extra", None) or {})
        support = sum(8 * support_size(out_f, in_f, density) for _, out_f, in_f in targets)
        largest = max(out_f * in_f for _, out_f, in_f in targets)
        return {"weights.adapters": support, "gradients.sltrain_dense": 2 * largest * opts.elt}

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        sparsify_low_rank(model, cfg.rank, cfg.alpha, density_of(cfg.extra), cfg.seed)
        return factor_groups(model, (".A", ".B", ".values"), "sltrain")


SLTRAIN = register(SLTrain())
