"""Training memory: an analytic estimator (weights, gradients, optimizer states, activations) and a measurement
of real training steps to check it. Formulas and their sources: docs/memory.md.

    >>> from leantrain.memory import estimate
    >>> print(estimate("llama-1b", method="galore", rank=512, dtype="bf16").format_table())
"""
from __future__ import annotations

from .activations import activation_bytes
from .estimate import METHODS, OPTIMIZERS, MemoryReport, estimate, estimate_config, human_bytes, state_bytes
from .measure import MeasuredMemory, measure
from .modelspec import LLAMA_PRESETS, ModelSpec, ParamSpec, available_models, from_hf_config, from_module, model_spec

__all__ = ["METHODS", "OPTIMIZERS", "LLAMA_PRESETS", "MemoryReport", "MeasuredMemory", "ModelSpec", "ParamSpec",
           "activation_bytes", "available_models", "estimate", "estimate_config", "from_hf_config", "from_module", "human_bytes",
           "measure", "model_spec", "state_bytes"]
