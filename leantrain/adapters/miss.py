"""MiSS (formerly Bone): matrix shard sharing, and its BAT (block affine) variant.

Paper: Jiale Kang et al., arXiv 2409.15371 ("Bone: Block Affine Transformation ..." v1 -> "MiSS: Balancing LoRA
Performance and Efficiency with Simple Shard Sharing"). Math and file format follow PEFT's ``tuners/miss`` (the
authoritative implementation for round-tripping), see /work/shared/methods/bone_miss.md.

* ``variant="default"``: one block ``D`` (r x out), zeros. Every r-wide column shard of W receives ``D^T``::

      y = base(x) + sum_k(pad(x)[..., k*r:(k+1)*r]) @ D       # no weight materialisation
      ΔW = [D^T | D^T | ... ][:, :in]                         # in % r != 0: zero-pad x, crop ΔW (PEFT rule)

* ``variant="mini"``: ``D_mini`` (r x mini_r) tiled along out (``out % mini_r == 0``), then as default.
* ``variant="bat"``: one r x r matrix ``B_o`` per output block (out/r, r, r), zeros; every r x r block of W becomes
  ``W_oi (I + B_o) + B_o``. Needs ``in % r == 0`` and ``out % r == 0``. Forward materialises ΔW (as PEFT does), so
  it costs a weight-sized tensor per layer; unmerge inverts ``I + B_o`` in fp32 (PEFT's rule).

All variants start at zero, so the adapted model equals the base model at step 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, add_to_base_weight, base_weight, set_base_weight
from .config_fields import get_float, get_int
from .registry import register_adapter

MISS_VARIANTS = ("default", "bat", "mini")


@dataclass
class MissConfig:
    """One MiSS adapter: block size ``r`` (PEFT's shard size along in_features), ``variant`` default|bat|mini."""

    peft_type: ClassVar[str] = "MISS"

    r: int = 64
    variant: str = "default"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None  # None = skip the task head for all-linear / regex targets
    dropout: float = 0.0  # PEFT's miss_dropout (default / mini variants only)
    mini_r: int = 1  # out-dimension tile of the "mini" variant
    init_weights: bool = True  # False: random block (tests only; PEFT's init_weights=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"MissConfig.r={self.r!r} must be a positive integer")
        if self.variant not in MISS_VARIANTS:
            raise ValueError(f"MissConfig.variant={self.variant!r}; choose one of {', '.join(MISS_VARIANTS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"MissConfig.dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.mini_r, int) or self.mini_r <= 0:
            raise ValueError(f"MissConfig.mini_r={self.mini_r!r} must be a positive integer")

    # ---- PEFT adapter_config.json ----------------------------------------------------------------------------
    def to_peft_dict(self, targets: list[str]) -> dict[str, Any]:
        init: Any = {"default": True, "bat": "bat", "mini": "mini"}[self.variant]
        if self.variant == "default" and not self.init_weights:
            init = False
        return {"peft_type": self.peft_type, "r": self.r, "init_weights": init, "miss_dropout": self.dropout,
                "mini_r": self.mini_r, "target_modules": targets, "exclude_modules": self.exclude_modules,
                "bias": "none", "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> MissConfig:
        init = d.get("init_weights", True)
        variant = init if init in ("bat", "mini") else "default"
        if d.get("bias", "none") not in ("none", None):
            raise ValueError(f"MiSS adapter_config.json has bias={d['bias']!r}; only 'none' is supported")
        targets = d.get("target_modules") or "all-linear"
        if init not in (True, False, "bat", "mini"):
            raise ValueError(f"MiSS adapter_config.json: init_weights={init!r} must be true, false, 'bat' or 'mini'")
        return cls(r=get_int(d, "r", 64, "MiSS", minimum=1), variant=variant, target_modules=targets,
                   exclude_modules=d.get("exclude_modules"), dropout=get_float(d, "miss_dropout", 0.0, "MiSS"),
                   mini_r=get_int(d, "mini_r", 1, "MiSS", minimum=1), init_weights=init is not False)


# ---- pure math (tensors in, tensors out) ---------------------------------------------------------------------
def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of r and sum its r-wide shards: (..., in) -> (..., r)."""
    pad = (r - x.shape[-1] % r) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)


def miss_delta(block: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ΔW (out x in) of the default variant: D^T repeated along in, the last partial shard cropped."""
    r = block.shape[0]
    reps = -(-in_features // r)
    return block.T.repeat(1, reps)[:, :in_features]


def bat_delta(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """BAT ΔW: block (o, i) is ``W_oi B_o + B_o`` for W (out x in) and B (out/r, r, r) (PEFT's block view)."""
    n_out, r = blocks.shape[0], blocks.shape[-1]
    out_f, in_f = weight.shape
    w4 = weight.reshape(n_out, r, in_f // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r)
    return (w4 @ blocks + blocks).permute(1, 2, 0, 3).reshape(out_f, in_f)


def bat_restore(merged: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of ``W + bat_delta(W, B)``: ``W_oi = (W'_oi - B_o)(I + B_o)^-1`` in fp32."""
    n_out, r = blocks.shape[0], blocks.shape[-1]
    out_f, in_f = merged.shape
    b = blocks.float()
    inv = torch.linalg.inv(torch.eye(r, dtype=torch.float32, device=b.device) + b)
    w4 = merged.float().reshape(n_out, r, in_f // r, r).permute(2, 0, 1, 3)
    return ((w4 - b) @ inv).permute(1, 2, 0, 3).reshape(out_f, in_f)


# ---- layer -----------------------------------------------------------------------------------------------------
class MissParams(nn.Module):
    """Tensors of one MiSS adapter: ``miss_block`` (PEFT's name and shape for the chosen variant)."""

    def __init__(self, shape: tuple[int, ...], variant: str, r: int, mini_r: int, dropout: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.variant, self.r, self.mini_r = variant, r, mini_r
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def expanded_block(self, out_features: int) -> torch.Tensor:
        """(r, out) block of the default/mini variants."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, out_features // self.mini_r)
        return self.miss_block


class MissLinear(AdapterLayer):
    """MiSS / BAT on nn.Linear (or a quantized Linear exposing ``dequantize()``)."""

    peft_keys: ClassVar[dict[str, str]] = {"miss_block": "miss_block"}

    def create_adapter(self, name: str, config: MissConfig) -> nn.Module:
        where = getattr(self, "layer_name", type(self.base_layer).__name__)
        n_in, n_out, r = self.in_features, self.out_features, config.r
        if r > n_in:
            raise ValueError(f"MiSS r={r} exceeds in_features={n_in} of layer {where!r} (weight {n_out}x{n_in})")
        if config.variant == "bat" and (n_in % r or n_out % r):
            raise ValueError(f"MiSS variant 'bat' needs in and out divisible by r={r}, but layer {where!r} has "
                             f"weight {n_out}x{n_in} (out x in); pick r dividing both or variant='default'")
        if config.variant == "mini" and n_out % config.mini_r:
            raise ValueError(f"MiSS variant 'mini' needs out_features divisible by mini_r={config.mini_r}, but "
                             f"layer {where!r} has weight {n_out}x{n_in}")
        shape = {"default": (r, n_out), "mini": (r, config.mini_r), "bat": (n_out // r, r, r)}[config.variant]
        weight = base_weight(self.base_layer)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        dropout = config.dropout if config.variant != "bat" else 0.0
        p = MissParams(shape, config.variant, r, config.mini_r, dropout, dtype, weight.device)
        if not config.init_weights:  # PEFT init_weights=False: random block so tests see a non-zero delta
            with torch.no_grad():
                nn.init.kaiming_uniform_(p.miss_block, a=5 ** 0.5)
        return p

    def delta_weight(self, name: str) -> torch.Tensor:
        p = self.adapters[name]
        w = base_weight(self.base_layer)
        if p.variant == "bat":
            delta = bat_delta(w.to(p.miss_block.dtype), p.miss_block)
        else:
            delta = miss_delta(p.expanded_block(self.out_features), self.in_features)
        return delta.to(w.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        x = x.to(p.miss_block.dtype)
        if p.variant == "bat":  # ΔW depends on W: materialise it (PEFT does the same, spec §5)
            w = base_weight(self.base_layer).detach().to(p.miss_block.dtype)
            return F.linear(x, bat_delta(w, p.miss_block))
        return shard_sum(p.dropout(x), p.r) @ p.expanded_block(self.out_features)

    def unmerge_one(self, name: str) -> None:
        p = self.adapters[name]
        if p.variant != "bat":
            return super().unmerge_one(name)
        w = base_weight(self.base_layer)
        set_base_weight(self.base_layer, bat_restore(w, p.miss_block.detach()).to(w.dtype))

    def merge_one(self, name: str) -> None:
        add_to_base_weight(self.base_layer, self.delta_weight(name).detach())


register_adapter(MissConfig, MissLinear)
