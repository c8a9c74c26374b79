"""Muon: momentum orthogonalised by a Newton-Schulz iteration for the matrices, AdamW for everything else.

Papers: K. Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024),
https://kellerjordan.github.io/posts/muon/ ; J. Liu et al., *Muon is Scalable for LLM Training*,
https://arxiv.org/abs/2502.16982 (the match-RMS-of-AdamW scaling, so Muon shares AdamW's learning rate).

For a matrix W (A x B) with gradient G_t (as ``torch.optim.Muon``, EMA form of the momentum):

    B_t = mu B_{t-1} + (1 - mu) G_t
    M_t = G_t + mu (B_t - G_t)  (nesterov)   or   M_t = B_t
    O_t = NS5(M_t):  X <- M / ||M||_F;  5 x { S = X X^T;  X <- a X + (b S + c S^2) X },  (a, b, c) =
          (3.4445, -4.7750, 2.0315), on the wide orientation, in bf16 (Keller Jordan's coefficients)
    W  <- W (1 - lr wd) - lr * k(A, B) * O_t,  k = sqrt(max(1, A/B)) ("original"),
          0.2 sqrt(max(A, B)) ("match_rms_adamw": the update's RMS becomes ~0.2, AdamW's), or 1 ("none").

Which tensors: a group's parameters with ndim >= 2 when its ``muon`` key is true (default); conv kernels are
viewed as (out, in * k * k). Everything else -- 1-D parameters, and groups with ``muon=False`` (the builder sets
that for the task head, embeddings and "other") -- is AdamW (torch's formula) in the same optimizer.

State: a matrix keeps one moment, ``momentum_buffer``; an AdamW tensor keeps ``exp_avg``/``exp_avg_sq``; both in
the codec of the group (``Muon``: fp32, ``Muon8bit``: leantrain's 8-bit block-wise codec, bitsandbytes #1973).

Distributed: NS needs the whole matrix, so FSDP2-sharded (DTensor) matrices are refused with an error; DDP
(replicated parameters, all-reduced gradients) works unchanged. Gradient projection (``rank``) is refused.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .adam import BlockOptimizer, adam_direction, apply_decoupled
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

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("original", "match_rms_adamw", "none")
ADAM_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))
MUON_MOMENTS = (("momentum_buffer", True),)


def newton_schulz(m: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate U V^T of ``m = U S V^T`` (quintic iteration; singular values land in ~[0.7, 1.2]).

    Runs on the wide orientation (the Gram matrix is the smaller side) and in ``dtype`` (bf16 as the papers);
    returns fp32."""
    a, b, c = coefficients
    x = m.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius >= spectral norm: every singular value in [0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).float()


def adjust_lr(shape: tuple[int, ...] | torch.Size, how: str) -> float:
    """Factor k(A, B) of the matrix update's learning rate (A = rows, B = the rest)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if how == "original":
        return math.sqrt(max(1.0, rows / cols))
    if how == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if how == "none":
        return 1.0
    raise ValueError(f"unknown adjust_lr_fn={how!r}; choose one of {', '.join(ADJUST_LR)}")


class Muon(BlockOptimizer):
    """Muon for the matrices of ``muon`` groups, AdamW for the rest; fp32 states (see the module docstring)."""

    moments = (*MUON_MOMENTS, *ADAM_MOMENTS)  # the union; each tensor keeps only its rule's subset
    default_codec = "fp32"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, *, adjust_lr_fn: str = "match_rms_adamw", ns_steps: int = 5,
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_eps: float = 1e-7,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, block_size: int = 256,
                 min_8bit_size: int = 4096, skip_nonfinite: bool = False, codec: str | None = None) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "adjust_lr_fn": adjust_lr_fn, "ns_steps": ns_steps, "ns_coefficients": tuple(ns_coefficients),
                    "ns_eps": ns_eps, "betas": tuple(betas), "eps": eps, "block_size": block_size,
                    "min_8bit_size": min_8bit_size, "skip_nonfinite": skip_nonfinite, "codec": codec,
                    "muon": True, "decoupled": True}
        super().__init__(params, defaults)

    def _check(self, g: dict[str, Any], where: str) -> None:
        super()._check(g, where)
        name = type(self).__name__
        if not 0.0 <= g.get("momentum", 0.0) < 1.0:
            raise ValueError(f"{name}: momentum={g['momentum']!r} in {where} must be in [0, 1)")
        if g.get("adjust_lr_fn", "none") not in ADJUST_LR:
            raise ValueError(f"{name}: unknown adjust_lr_fn={g['adjust_lr_fn']!r} in {where}; "
                             f"choose one of {', '.join(ADJUST_LR)}")
        steps = g.get("ns_steps", 5)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps < 100:
            raise ValueError(f"{name}: ns_steps={steps!r} in {where} must be an int in 1..99")
        if len(g.get("ns_coefficients", NS_COEFFICIENTS)) != 3:
            raise ValueError(f"{name}: ns_coefficients={g['ns_coefficients']!r} in {where} must be 3 numbers")
        if g.get("rank") is not None:
            raise ValueError(f"{name}: rank={g['rank']!r} in {where}: Muon does not project gradients")

    # ---- which rule, which moments ----------------------------------------------------------------------------
    @staticmethod
    def _is_matrix(group: dict[str, Any], p: Tensor) -> bool:
        return bool(group.get("muon", True)) and p.ndim >= 2

    @contextmanager
    def _moments_for(self, group: dict[str, Any], p: Tensor) -> Iterator[None]:
        """The core reads ``self.moments``; narrow it to this tensor's rule for the duration of one call."""
        self.moments = MUON_MOMENTS if self._is_matrix(group, p) else ADAM_MOMENTS
        try:
            yield
        finally:
            del self.moments  # back to the class attribute (the union)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        with self._moments_for(group, p):
            if self._is_matrix(group, p):
                self._matrix_update(p, group)
            else:
                super()._update(p, group)

    def _check_saved(self, pid: int, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        with self._moments_for(group, p):
            super()._check_saved(pid, p, st, group)

    def stored_numel(self, p: Tensor) -> int:
        with self._moments_for(self._group_of(p), p):
            return super().stored_numel(p)

    def decoded_moments(self, p: Tensor) -> dict[str, Tensor]:
        with self._moments_for(self._group_of(p), p):
            return super().decoded_moments(p)

    def store_moments(self, p: Tensor, moments: dict[str, Tensor]) -> None:
        with self._moments_for(self._group_of(p), p):
            super().store_moments(p, moments)

    # ---- the two rules ----------------------------------------------------------------------------------------
    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        """AdamW (torch's formula) for the non-matrix tensors."""
        return adam_direction(g, bufs, group, t)

    def _matrix_update(self, p: Tensor, group: dict[str, Any]) -> None:
        """One Muon step of a matrix: momentum (decoded whole: NS needs the full matrix), NS5, scaled update."""
        state, t = self._whole_matrix_step(p, "Newton-Schulz needs the whole matrix; or set muon=False for its "
                                                 "group")
        g = p.grad.reshape(p.shape[0], -1).float()
        n = g.numel()
        codec = self._codec(group, n, True, p)
        if not any("momentum_buffer" + sfx in state for sfx in codec.layout(n)):
            self._init_state(state, group, n, p)
        scale = self._gnorm_scale(g, state, group, t)
        if scale != 1.0:
            g = g * scale
        enc = self._enc(state, "momentum_buffer", codec, n)
        buf = codec.decode_range(enc, 0, n).view(g.shape)
        buf.lerp_(g, 1.0 - group["momentum"])
        m = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        o = newton_schulz(m, group["ns_steps"], group["ns_coefficients"], group["ns_eps"])
        codec.encode_range(enc, 0, buf.reshape(-1))
        self._apply(p, o, group)

    @staticmethod
    def _apply(p: Tensor, o: Tensor, group: dict[str, Any]) -> None:
        """W <- W (1 - lr wd) - lr k O, in fp32 (one rounding for a bf16/fp16 parameter)."""
        apply_decoupled(p, o, group["lr"], group.get("weight_decay", 0.0), adjust_lr(p.shape, group["adjust_lr_fn"]))


class Muon8bit(Muon):
    """Muon whose momentum (and the AdamW moments of the other tensors) use the 8-bit block-wise codec: one byte
    per matrix weight instead of AdamW8bit's two (tensors under ``min_8bit_size`` stay fp32)."""

    default_codec = "8bit"


# ---- registry ---------------------------------------------------------------------------------------------------
def muon_groups(groups: list[dict]) -> list[dict]:
    """The method's groups with ``muon`` set: true for its matrices ("linear" and unnamed groups), false for the
    task head, embeddings / norms ("other") and DLRT factors ("lowrank"), which the papers leave to AdamW."""
    return [{**g, "muon": g.get("name") not in ("head", "other", "lowrank")} for g in groups]


def _muon_builder(cls: type[Muon]):
    def build(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
        """match_rms_adamw scaling, so Muon runs at the AdamW learning rate of the task (Liu et al. 2025)."""
        return cls(muon_groups(groups), lr=lr, momentum=0.95, nesterov=True, weight_decay=opts.weight_decay,
                   adjust_lr_fn="match_rms_adamw", betas=opts.betas, block_size=opts.block_size)

    return build


def _muon_state(codec: str) -> StateBytes:
    def count(t: StateTensor, o: StateOptions) -> tuple[int, int]:
        """Estimator: one momentum for a matrix of a Muon group, AdamW's two moments for everything else."""
        moments = 1 if t.matrix and len(t.shape) >= 2 else 2
        return STEP_BYTES + moments * codec_bytes(codec, math.prod(t.shape), o.block_size, o.elt), 0

    return count


# Default lr vs AdamW's: classify 1 (match-RMS scaling lets Muon reuse AdamW's lr, Liu et al. 2025); causal-lm
# 10/3: measured on tiny-LLaMA pre-training, 60 steps, best of {3e-3, 1e-2} is 1e-2 (docs/optimizers2.md).
MUON_LR_SCALE = {"causal-lm": 10 / 3}
register(OptimizerSpec("muon", _muon_builder(Muon), states=1, codec="fp32", state_bytes=_muon_state("native"),
                       summary="Muon: Newton-Schulz-orthogonalised momentum for matrices (AdamW lr via "
                               "match-RMS scaling), AdamW for head/embeddings/1-D", lr_scale=MUON_LR_SCALE))
register(OptimizerSpec("muon8bit", _muon_builder(Muon8bit), states=1, codec="8bit", state_bytes=_muon_state("8bit"),
                       summary="Muon with 8-bit block-wise momentum (AdamW8bit for head/embeddings/1-D)",
                       options=("block_size",), lr_scale=MUON_LR_SCALE))
