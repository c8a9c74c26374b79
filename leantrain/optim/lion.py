"""Lion (EvoLved Sign Momentum) with block-wise 8-bit momentum.

Papers: Chen et al., *Symbolic Discovery of Optimization Algorithms*, https://arxiv.org/abs/2302.06675 (Lion);
Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, https://arxiv.org/abs/2110.02861 (8-bit state).
Lion keeps one moment, so 8-bit state is ≈1.02 bytes/param.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .adam import BlockOptimizer
from .spec import OptimizerOptions, OptimizerSpec, register


class Lion8bit(BlockOptimizer):
    """u = sign(b1 m + (1 - b1) g); p <- p (1 - lr wd) - lr u; m <- b2 m + (1 - b2) g."""

    moments = (("exp_avg", True),)
    default_codec = "8bit"

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, block_size: int = 256, min_8bit_size: int = 4096,
                 percentile_clipping: int = 100, skip_nonfinite: bool = False, codec: str | None = None,
                 chunk_size: int = 1 << 18) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "block_size": block_size,
                        "min_8bit_size": min_8bit_size, "percentile_clipping": percentile_clipping,
                        "skip_nonfinite": skip_nonfinite, "codec": codec, "chunk_size": chunk_size, "decoupled": True}
        super().__init__(params, defaults)

    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        (m,) = bufs
        b1, b2 = group["betas"]
        u = m.lerp(g, 1.0 - b1).sign_()
        m.lerp_(g, 1.0 - b2)
        return u, 1.0


def build_lion8bit(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    return Lion8bit(groups, lr=lr, betas=(0.9, 0.99), weight_decay=opts.weight_decay, block_size=opts.block_size)


# lr_scale: the Lion paper (Chen et al. 2023, https://arxiv.org/abs/2302.06675, section 5): "the default learning
# rate for Lion is typically 3-10x smaller than that for AdamW" (the sign update has unit size per weight).
register(OptimizerSpec("lion8bit", build_lion8bit, states=1, codec="8bit",
                       summary="Lion (sign momentum), 8-bit momentum, betas (0.9, 0.99)", options=("block_size",),
                       lr_scale=0.3))
