"""Training memory: an analytic estimator (weights, gradients, optimizer states, activations) and a measurement
of real training steps to check it. Formulas and their sources: docs/memory.md.

    >>> from leantrain.memory import estimate
    >>> print(estimate("llama-1b", method="full", optim="galore-adamw", rank=512, dtype="bf16").format_table())

The estimator is pure Python (no torch import, so ``leantrain memory`` starts fast); ``measure`` loads lazily.
"""
from __future__ import annotations

import importlib

from .activations import activation_bytes
from .estimate import (
    ESTIMATED_METHODS,
    METHOD_ALIASES,
    METHODS,
    OPTIMIZERS,
    MemoryReport,
    estimate,
    estimate_config,
    human_bytes,
    resolve_method_alias,
    state_bytes,
)
from .modelspec import (
    LLAMA_PRESETS,
    ModelSpec,
    ParamSpec,
    available_models,
    from_hf_config,
    from_module,
    model_spec,
)

_LAZY = {"measure": "leantrain.memory.measuring", "MeasuredMemory": "leantrain.memory.measuring",
         "measure_config": "leantrain.memory.measuring"}

__all__ = [
    "ESTIMATED_METHODS", "LLAMA_PRESETS", "METHODS", "METHOD_ALIASES", "OPTIMIZERS", "MeasuredMemory", "MemoryReport", "ModelSpec", "ParamSpec",
    "activation_bytes", "available_models", "estimate", "estimate_config", "from_hf_config", "from_module",
    "human_bytes", "measure", "measure_config", "model_spec", "resolve_method_alias", "state_bytes",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leantrain.memory' has no attribute {name!r}")
