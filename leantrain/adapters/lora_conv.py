"""LoRA on nn.Conv2d (PEFT's layout): A is a conv with the base kernel and r output channels, B a 1×1 conv.

ΔW = s · (B.view(out, r) @ A.view(r, in·kh·kw)).view(out, in, kh, kw)
y  = conv(x, W) + s · conv1×1(conv(x, A), B).
Keys ``lora_A.weight`` (r, in, kh, kw) and ``lora_B.weight`` (out, r, 1, 1), as PEFT saves them. Plain LoRA
and rsLoRA only (DoRA/PiSSA on convolutions are not implemented); groups must be 1.
Paper: https://arxiv.org/abs/2106.09685

The LoRA registry entry (end of ``lora.py``) names ``LoraConv2d`` by string; this module imports ``lora`` and
nothing imports it back.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer
from .lora import LoraConfig, LoraParams, adapter_dtype, init_lora


class LoraConv2d(AdapterLayer):
    """LoRA on an ungrouped nn.Conv2d (see the module docstring for the layout)."""

    peft_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def create_adapter(self, name: str, config: LoraConfig) -> nn.Module:
        where = getattr(self, "layer_name", "conv")
        conv = self.base_layer
        if config.use_dora or config.init in ("pissa", "pissa_fast"):
            raise TypeError(f"{where!r}: DoRA and PiSSA are implemented for Linear layers, not nn.Conv2d")
        if conv.groups != 1:
            raise TypeError(
                f"{where!r}: LoRA on grouped convolutions (groups={conv.groups}) is not supported"
            )
        r, alpha = config.rank_alpha(where)
        kh, kw = conv.kernel_size
        p = LoraParams(
            r,
            1,
            1,
            config.scaling(r, alpha),
            config.dropout,
            False,
            adapter_dtype(conv.weight),
            conv.weight.device,
        )
        p.lora_A = nn.Parameter(
            torch.empty(r, conv.in_channels, kh, kw, dtype=p.lora_A.dtype, device=p.lora_A.device)
        )
        p.lora_B = nn.Parameter(
            torch.empty(conv.out_channels, r, 1, 1, dtype=p.lora_B.dtype, device=p.lora_B.device)
        )
        with torch.no_grad():  # Linear's init: fan-in of the 4-d A is in·kh·kw, as in PEFT's conv layer
            init_lora(p.lora_A, p.lora_B, config.init)
        return p

    def delta_weight(self, name: str) -> torch.Tensor:
        p = self.adapters[name]
        w = self.base_layer.weight
        r = p.lora_A.shape[0]
        delta = p.lora_B.reshape(-1, r) @ p.lora_A.reshape(r, -1)
        return (p.scaling * delta).reshape(w.shape).to(w.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        c = self.base_layer
        x = p.dropout(x.to(p.lora_A.dtype))
        h = F.conv2d(x, p.lora_A, None, c.stride, c.padding, c.dilation)
        return F.conv2d(h, p.lora_B) * p.scaling

