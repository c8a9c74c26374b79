"""SGD with momentum kept in block-wise 8-bit state (paper's "8-bit Momentum").

Paper: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, https://arxiv.org/abs/2110.02861.
Same update as ``torch.optim.SGD`` (L2 weight decay added to the gradient, buffer = g at the first step).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .adam import BlockOptimizer
from .spec import OptimizerOptions, OptimizerSpec, register


class SGD8bit(BlockOptimizer):
    """buf <- momentum buf + (1 - dampening) g (buf = g at step 1); p <- p - lr (g + momentum buf if nesterov
    else buf)."""

    moments = (("momentum_buffer", True),)
    default_codec = "8bit"

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, block_size: int = 256,
                 min_8bit_size: int = 4096, percentile_clipping: int = 100, skip_nonfinite: bool = False,
                 codec: str | None = None, chunk_size: int = 1 << 18) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"SGD8bit: momentum={momentum!r} must be in (0, 1) (use torch.optim.SGD without "
                             "momentum: it has no state to quantize)")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"SGD8bit: dampening={dampening!r} must be in [0, 1]")
        if nesterov and dampening != 0:
            raise ValueError("SGD8bit: nesterov momentum requires dampening=0")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                        "nesterov": nesterov, "block_size": block_size, "min_8bit_size": min_8bit_size,
                        "percentile_clipping": percentile_clipping, "skip_nonfinite": skip_nonfinite, "codec": codec,
                        "chunk_size": chunk_size, "decoupled": False}
        super().__init__(params, defaults)

    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        (buf,) = bufs
        mom = group["momentum"]
        if t == 1:
            buf.copy_(g)
        else:
            buf.mul_(mom).add_(g, alpha=1.0 - group["dampening"])
        return (g.add(buf, alpha=mom) if group["nesterov"] else buf), 1.0


def build_sgd8bit(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    return SGD8bit(groups, lr=lr, momentum=0.9, weight_decay=opts.weight_decay, block_size=opts.block_size)


register(OptimizerSpec("sgd8bit", build_sgd8bit, states=1, codec="8bit",
                       summary="SGD with momentum 0.9, 8-bit momentum", options=("block_size",)))
