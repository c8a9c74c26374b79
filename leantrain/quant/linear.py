"""QuantLinear: a frozen linear layer stored as NF4 / int8 block-wise codes, dequantized on the fly.

QLoRA (https://arxiv.org/abs/2305.14314): the base weight is stored in 4 bits and dequantized to the compute
dtype for every matmul; adapters on top train in full precision. :class:`_QuantMatmul` recomputes the dense
weight in the backward pass instead of saving it, so no dense fp32 copy outlives a forward or backward call.

Adapter contract (notes/ADAPTER_CONTRACT.md): ``in_features``, ``out_features``, ``dequantize()`` and
``add_to_weight(delta)``. ``add_to_weight`` never silently loses a delta: by default (``merge_policy="exact"``)
it accumulates into a dense fp32 ``residual`` buffer (exact merge/unmerge, costs dense memory while merged);
with ``merge_policy="requantize"`` it re-quantizes ``W + delta`` and warns when most of the delta was rounded
away (see :meth:`QuantLinear.requantize`).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .functional import QuantizedTensor, check_float, dequantize_tensor, quantize_tensor

MERGE_POLICIES = ("exact", "requantize")
# requantize() warns when the re-quantized weight keeps less than this share of the merged delta.
LOST_DELTA_WARNING = 0.5

_QT_FIELDS = ("data", "code", "absmax", "absmax_idx", "absmax_scale", "absmax_offset", "absmax_code")


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (nothing dense is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class QuantLinear(nn.Module):
    """Frozen ``nn.Linear`` replacement holding packed uint8 codes + block scales (+ optional fp32 residual)."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32, merge_policy: str = "exact") -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {qweight.shape}")
        if merge_policy not in MERGE_POLICIES:
            raise ValueError(f"merge_policy={merge_policy!r}; choose one of {MERGE_POLICIES}")
        self.out_features, self.in_features = (int(s) for s in qweight.shape)
        self.bits = qweight.bits
        self.block_size = qweight.block_size
        self.weight_dtype = weight_dtype
        self.merge_policy = merge_policy
        self._set_qweight(qweight)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("residual", None)  # dense fp32 sum of merged deltas (merge_policy="exact")

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, block_size: int = 64, double_quant: bool = True,
                    merge_policy: str = "exact") -> QuantLinear:
        weight = linear.weight
        check_float(weight, f"weight of {type(linear).__name__}")
        qweight = quantize_tensor(weight, bits=bits, block_size=block_size, double_quant=double_quant)
        return cls(qweight, linear.bias, weight_dtype=weight.dtype, merge_policy=merge_policy)

    def _set_qweight(self, q: QuantizedTensor) -> None:
        for name in _QT_FIELDS:
            value = getattr(q, name)
            if name in self._buffers or value is not None:
                self.register_buffer(name, value)
        self.double_quant = q.double_quant

    @property
    def qweight(self) -> QuantizedTensor:
        """The quantized weight as a :class:`QuantizedTensor` view of this layer's buffers."""
        fields = {name: getattr(self, name, None) for name in _QT_FIELDS}
        return QuantizedTensor(shape=(self.out_features, self.in_features), bits=self.bits,
                               block_size=self.block_size, **fields)

    # ---- contract ----------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense effective weight (codes * scales + merged residual) in ``dtype`` (default: original dtype)."""
        dtype = dtype or self.weight_dtype
        weight = dequantize_tensor(self.qweight, torch.float32 if self.residual is not None else dtype)
        if self.residual is not None:
            weight = (weight + self.residual).to(dtype)
        return weight

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """``W += delta``: into the fp32 residual (exact) or by re-quantizing (``merge_policy="requantize"``)."""
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"delta shape {tuple(delta.shape)} does not match the weight "
                             f"({self.out_features}, {self.in_features})")
        delta = delta.detach().to(device=self.data.device, dtype=torch.float32)
        if self.merge_policy == "requantize":
            self.residual = delta if self.residual is None else self.residual + delta
            self.requantize()
        elif self.residual is None:
            self.residual = delta.clone()
        else:
            self.residual += delta

    @torch.no_grad()
    def requantize(self, warn: bool = True) -> dict[str, float]:
        """Fold the residual into the codes (lossy) and drop it. Returns the error report.

        ``lost`` = ||Q(W + R) - (W + R)|| / ||R||: the share of the merged delta R the codes cannot represent.
        LoRA deltas are usually far smaller than an NF4 step (~0.1 x absmax), so ``lost`` is often near 1 --
        then merged inference should use a dense layer (:func:`leantrain.quant.dequantize_model`) instead.
        """
        if self.residual is None:
            return {"lost": 0.0, "rel_error": 0.0}
        target = self.dequantize(torch.float32)
        delta_norm = float(self.residual.norm())
        q = quantize_tensor(target, bits=self.bits, block_size=self.block_size, double_quant=self.double_quant)
        error = float((dequantize_tensor(q) - target).norm())
        self._set_qweight(q)
        self.residual = None
        report = {"lost": error / delta_norm if delta_norm > 0 else 0.0,
                  "rel_error": error / max(float(target.norm()), 1e-30)}
        if warn and report["lost"] > LOST_DELTA_WARNING:
            warnings.warn(f"re-quantizing a {self.bits}-bit layer lost {report['lost']:.0%} of the merged delta "
                          "(norm ratio); use dequantize_model() for an exact dense merge", stacklevel=2)
        return report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, QuantLinear expects {self.in_features}")
        return _QuantMatmul.apply(x, self.bias, self)

    # ---- conversion / reporting --------------------------------------------------------------------------------
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with the effective weight (codes + residual), frozen like this layer."""
        dtype = dtype or self.weight_dtype
        device = self.data.device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def nbytes(self) -> int:
        """Bytes held by this layer: codes, scales, code books, bias and (if merged) the dense residual."""
        tensors = [t for t in self.buffers(recurse=False)] + [p for p in self.parameters(recurse=False)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def quant_nbytes(self) -> int:
        """Bytes of the quantized weight alone (codes + scales + code books), for bits-per-weight figures."""
        return self.qweight.nbytes()

    def extra_repr(self) -> str:
        kind = "nf4" if self.bits == 4 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, block_size={self.block_size}, double_quant={self.double_quant}")
