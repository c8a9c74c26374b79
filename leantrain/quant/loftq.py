"""LoftQ: quantization-aware LoRA initialisation (Li et al. 2023, https://arxiv.org/abs/2310.08659, Alg. 1).

Alternate ``Q_t = quantize(W - s·B_{t-1} A_{t-1})`` and ``s·B_t A_t = SVD_r(W - dequant(Q_t))`` starting from
``B_0 A_0 = 0``, so that ``dequant(Q) + s·B A`` approximates the full-precision W better than ``dequant(Q)``
alone: the adapter starts by correcting the quantization error instead of at zero (LQ-LoRA uses the same split).
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import QuantizedTensor, check_float, dequantize_tensor, quantize_tensor
from .linear import QuantLinear


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, bits: int = 4, iters: int = 5, block_size: int = 64,
               double_quant: bool = True, scaling: float = 1.0
               ) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Return ``(qweight, lora_A (r, in), lora_B (out, r))`` with ``dequant(qweight) + scaling·B A ≈ weight``.

    ``iters`` = T alternations (LoftQ uses 1-5; each costs one quantization and one SVD). The singular values
    are split evenly between A and B (``sqrt(S/scaling)`` each), as PiSSA does.
    """
    check_float(weight)
    if weight.dim() != 2:
        raise ValueError(f"loftq_init needs a 2-D weight, got shape {tuple(weight.shape)}")
    if not isinstance(r, int) or not 0 < r <= min(weight.shape):
        raise ValueError(f"LoftQ rank r={r!r} must be an int in [1, {min(weight.shape)}] for shape "
                         f"{tuple(weight.shape)}")
    if iters < 1:
        raise ValueError(f"LoftQ iters={iters!r} must be >= 1")
    if scaling <= 0:
        raise ValueError(f"LoftQ scaling={scaling!r} must be > 0")
    w = weight.detach().to(torch.float32)
    low_rank = torch.zeros_like(w)
    for _ in range(iters):
        q = quantize_tensor(w - low_rank, bits=bits, block_size=block_size, double_quant=double_quant)
        u, s, vh = torch.linalg.svd(w - dequantize_tensor(q), full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        lora_a, lora_b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        low_rank = scaling * (lora_b @ lora_a)
    return q, lora_a, lora_b


def reconstruction_errors(weight: torch.Tensor, r: int, bits: int = 4, iters: int = 5, block_size: int = 64,
                          double_quant: bool = True) -> dict[str, float]:
    """Relative Frobenius errors of plain quantization vs LoftQ (Q + BA) for one weight."""
    w = weight.detach().to(torch.float32)
    plain = dequantize_tensor(quantize_tensor(w, bits=bits, block_size=block_size, double_quant=double_quant))
    q, a, b = loftq_init(w, r, bits=bits, iters=iters, block_size=block_size, double_quant=double_quant)
    norm = float(w.norm())
    return {"quant": float((w - plain).norm()) / norm, "loftq": float((w - dequantize_tensor(q) - b @ a).norm()) / norm}


@torch.no_grad()
def apply_loftq(model: nn.Module, adapter_name: str = "default", bits: int = 4, iters: int = 5,
                block_size: int = 64, double_quant: bool = True) -> dict[str, dict[str, float]]:
    """LoftQ-initialise an injected LoRA adapter and quantize its (still dense) base layers.

    Use on a model where LoRA was injected into full-precision ``nn.Linear`` layers (``leantrain.adapters.inject``):
    each wrapped base becomes a :class:`QuantLinear` holding LoftQ's Q and the adapter's ``lora_A``/``lora_B``
    are overwritten so that the layer's output approximates the original dense layer. Returns per layer the
    relative weight error ``quant`` (plain quantization, adapter at zero) and ``loftq`` (Q + s·BA).
    """
    from leantrain.adapters.inject import adapter_layers  # lazy: keep leantrain.quant importable on its own

    report: dict[str, dict[str, float]] = {}
    for name, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        params = layer.adapters[adapter_name]
        if not hasattr(params, "lora_A"):
            raise TypeError(f"{name}: adapter {adapter_name!r} is a {type(layer).__name__}, LoftQ needs LoRA")
        if getattr(params, "magnitude", None) is not None:
            raise TypeError(f"{name}: LoftQ init is not defined for DoRA adapters")
        if layer.merged_adapters:
            raise ValueError(f"{name}: unmerge {layer.merged_adapters} before LoftQ init")
        base = layer.base_layer
        if isinstance(base, QuantLinear) or not isinstance(base, nn.Linear):
            raise TypeError(f"{name}: LoftQ needs the full-precision nn.Linear base, found {type(base).__name__}; "
                            "inject LoRA before quantizing and call apply_loftq instead of quantize()")
        w = base.weight.detach().to(torch.float32)
        q, lora_a, lora_b = loftq_init(w, params.lora_A.shape[0], bits=bits, iters=iters, block_size=block_size,
                                       double_quant=double_quant, scaling=float(params.scaling))
        plain = dequantize_tensor(quantize_tensor(w, bits=bits, block_size=block_size, double_quant=double_quant))
        params.lora_A.copy_(lora_a.to(params.lora_A.dtype))
        params.lora_B.copy_(lora_b.to(params.lora_B.dtype))
        layer.base_layer = QuantLinear(q, base.bias, weight_dtype=base.weight.dtype)
        approx = dequantize_tensor(q) + params.scaling * (lora_b @ lora_a)
        norm = float(w.norm())
        report[name] = {"quant": float((w - plain).norm()) / norm, "loftq": float((w - approx).norm()) / norm}
    if not report:
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r} to initialise with LoftQ")
    return report
