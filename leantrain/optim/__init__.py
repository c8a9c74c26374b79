"""Memory-efficient optimizers: ordinary ``torch.optim.Optimizer`` classes built from an update rule, an optional
gradient projector (GaLore / GradNormLoRP) and a state codec (fp32 / bf16 / 8-bit / 4-bit).

Names resolve lazily so ``import leantrain`` stays cheap.
"""
from __future__ import annotations

import importlib

from .registry import available_optimizers, build_optimizer, get_spec, specs
from .spec import OptimizerSpec

_LAZY = {
    "AdamW": "leantrain.optim.adam",
    "Adam8bit": "leantrain.optim.adam",
    "AdamW8bit": "leantrain.optim.adam",
    "AdamW4bit": "leantrain.optim.adam",
    "Lion8bit": "leantrain.optim.lion",
    "SGD8bit": "leantrain.optim.sgd",
    "StableEmbedding": "leantrain.optim.embedding",
    "GaLoreAdamW": "leantrain.optim.galore",
    "GaLoreAdamW8bit": "leantrain.optim.galore",
}

__all__ = ["Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit", "Lion8bit",
           "OptimizerSpec", "SGD8bit", "StableEmbedding", "available_optimizers", "build_optimizer", "get_spec",
           "specs"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leantrain.optim' has no attribute {name!r}")
