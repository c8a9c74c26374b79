"""Quantized frozen base weights (QLoRA-style NF4 / int8 block-wise) with adapters on top, pure PyTorch.

Paper: QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 (NF4, double quantization);
LoftQ, Li et al. 2023, https://arxiv.org/abs/2310.08659 (quantization-aware LoRA init). See docs/quantized.md.
"""
from __future__ import annotations

from .convert import (
    dequantize_model,
    merge,
    model_nbytes,
    quantize,
    quantize_while_building,
    quantized_layers,
    quantizes_before_method,
    target_linear_names,
)
from .functional import (
    QuantizedTensor,
    dequantize_tensor,
    dynamic_code,
    int8_code,
    nf4_code,
    quantize_tensor,
)
from .io import load_quantized, save_quantized
from .linear import QuantLinear
from .loftq import apply_loftq, loftq_init

__all__ = [
    "QuantLinear",
    "QuantizedTensor",
    "apply_loftq",
    "dequantize_model",
    "dequantize_tensor",
    "dynamic_code",
    "int8_code",
    "load_quantized",
    "loftq_init",
    "merge",
    "model_nbytes",
    "nf4_code",
    "quantize",
    "quantize_tensor",
    "quantize_while_building",
    "quantized_layers",
    "quantizes_before_method",
    "save_quantized",
    "target_linear_names",
]
