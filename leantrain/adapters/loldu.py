"""LoLDU: train only the diagonal of an LU (LDU) factorisation of each weight, plus one scale per layer.

Paper: Shi et al., *LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning*, 2024, https://arxiv.org/abs/2410.13618. ``torch.linalg.lu`` gives W = P L U (P a permutation,
L unit lower triangular, U upper triangular); writing U = diag(d) U' (U' unit upper) gives W = P L diag(d) U'.
The leading r columns of L and rows of U' make a rank-r part; LoLDU keeps it as the adapter and writes the rest
back as a frozen residual::

    W_res = W - s0 * P L_r diag(d_r) U'_r          (s0 = alpha / r, z0 = d_r: the model starts unchanged)
    y     = W_res x + s * P L_r diag(z) U'_r x     (only z (r values) and the scalar s train)

P, L_r and U'_r are frozen buffers (P stored as a row permutation, ``perm``: (P M)[i] = M[perm[i]]). Merge adds
ΔW = s P L_r diag(z) U'_r to W_res and unmerge subtracts it again (exact up to fp32 round-off). Like PiSSA, the
base of an adapted model is the residual; loading a saved adapter onto the original base recomputes the same
residual (the LU of the same W is deterministic), so the files need no copy of W.

PEFT has no LoLDU: its files (``peft_type`` "LOLDU", leantrain's safetensors + JSON layout of
``leantrain.adapters.io``) load with ``leantrain.adapters.load``, not with ``peft.PeftModel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TrainConfig
from ..methods import EstimatorTensor, register
from .base import AdapterLayer, base_weight, set_base_weight
from .lora import adapter_dtype
from .methods import AdapterMethod, parse_targets
from .registry import register_adapter


@dataclass
class LolduConfig:
    """One LoLDU adapter: ``r`` leading LU components per layer, initial scale ``alpha / r``."""

    peft_type: ClassVar[str] = "LOLDU"

    r: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None  # None = skip the task head for all-linear / regex targets
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LolduConfig.r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"LolduConfig.alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LolduConfig.dropout={self.dropout!r} must be in [0, 1)")


# ---- pure math (tensors in, tensors out) ---------------------------------------------------------------------
def ldu_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, L_r, d_r, U'_r) of W = P L diag(d) U' in fp32, truncated to the r leading components.

    ``perm`` is P as row indices; a zero pivot (rank-deficient W) gets d = 0 and a zero U' row, which keeps
    P L_r diag(d_r) U'_r equal to the leading part of P L U."""
    out_f, in_f = weight.shape
    if r > min(out_f, in_f):
        raise ValueError(f"LoLDU r={r} exceeds min(out, in)={min(out_f, in_f)} of a {out_f}x{in_f} weight")
    p, lower, upper = torch.linalg.lu(weight.float())
    d = torch.diagonal(upper)[:r].clone()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = upper[:r] / safe[:, None]
    return p.argmax(dim=1), lower[:, :r].contiguous(), d, unit_upper.contiguous()


def ldu_delta(perm: torch.Tensor, lower: torch.Tensor, z: torch.Tensor, upper: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
    """ΔW = s P L_r diag(z) U'_r (out x in): the adapter's dense weight."""
    return (scale * (lower * z) @ upper)[perm]


def ldu_apply(x: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor, z: torch.Tensor, upper: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
    """s P L_r diag(z) U'_r x without materialising ΔW: two thin matmuls and a gather of the outputs."""
    h = (x @ upper.T) * z
    return (scale * (h @ lower.T))[..., perm]


# ---- layer -----------------------------------------------------------------------------------------------------
class LolduParams(nn.Module):
    """Tensors of one LoLDU adapter: trainable ``z`` (r) and ``scale`` (scalar); frozen ``perm``, ``lower``,
    ``upper`` (buffers: in checkpoints and files, never in the optimizer)."""

    def __init__(self, factors: tuple[torch.Tensor, ...], alpha: float, dropout: float,
                 dtype: torch.dtype) -> None:
        super().__init__()
        perm, lower, d, upper = factors
        r = d.numel()
        self.z = nn.Parameter(d.to(dtype))
        self.scale = nn.Parameter(torch.tensor(alpha / r, dtype=dtype, device=d.device))
        self.register_buffer("perm", perm)
        self.register_buffer("lower", lower.to(dtype))
        self.register_buffer("upper", upper.to(dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self) -> torch.Tensor:
        return ldu_delta(self.perm, self.lower, self.z, self.upper, self.scale)


class LolduLinear(AdapterLayer):
    """LoLDU on a Linear(-like) layer; creating an adapter replaces W by the residual W_res (see module doc)."""

    def create_adapter(self, name: str, config: LolduConfig) -> nn.Module:
        if self.adapters:
            raise ValueError(f"LoLDU adapter {name!r}: this layer already holds {list(self.adapters)}; "
                             "LoLDU rewrites the base weight, so one LoLDU adapter per layer")
        weight = base_weight(self.base_layer)
        factors = ldu_factors(weight.detach(), config.r)
        params = LolduParams(factors, config.alpha, config.dropout, adapter_dtype(weight))
        with torch.no_grad():
            residual = weight.float() - params.delta().float()
            set_base_weight(self.base_layer, residual.to(weight.dtype))
        return params

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.adapters[name].delta().to(base_weight(self.base_layer).dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        return ldu_apply(p.dropout(x.to(p.z.dtype)), p.perm, p.lower, p.z, p.upper, p.scale)


def loldu_tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    """Estimator terms per adapted Linear: z (r) and s train; L_r (out x r) and U'_r (r x in) are frozen."""
    r = cfg.rank
    return [EstimatorTensor(module + ".z", (r,)), EstimatorTensor(module + ".scale", (1,)),
            EstimatorTensor(module + ".lower", (out_f, r), trains=False),
            EstimatorTensor(module + ".upper", (r, in_f), trains=False)]


def loldu_perm_bytes(targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
    """P as int64 row indices (8 bytes per output row of every adapted layer)."""
    return {"weights.adapters": sum(8 * out_f for _, out_f, _ in targets)}


register_adapter(LolduConfig, LolduLinear)


def _build(cfg: TrainConfig) -> LolduConfig:
    return LolduConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=parse_targets(cfg.targets))


class LolduMethod(AdapterMethod):
    """``--method loldu``: inject LolduConfig (r = --rank, s0 = --alpha / r); z and s are the param group."""

    def validate(self, cfg: TrainConfig) -> None:
        if cfg.init != "default":
            raise ValueError(f"TrainConfig.init={cfg.init!r}: LoLDU initialises from the LU of W; use default")
        if cfg.lora_plus_ratio is not None:
            raise ValueError("TrainConfig.lora_plus_ratio: LoRA+ splits A and B, but LoLDU trains only z and s")


LOLDU = register(LolduMethod("loldu", _build, "LoLDU: frozen P L U' of each weight, only diag z and a scale train",
                             loldu_tensors, lambda o, i, r: 2 * r, default_lr=5e-3, extras=loldu_perm_bytes,
                             options=("rank", "alpha", "dropout", "targets")))
