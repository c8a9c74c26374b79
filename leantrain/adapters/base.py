"""AdapterLayer: the one wrapper every adapter method (LoRA, DoRA, VeRA, SHiRA, MiSS, ...) subclasses.

A wrapped layer keeps the original module as ``self.base_layer`` and holds any number of *named* adapters of
its own kind, each in a small sub-module ``self.adapters[name]``. Keeping each adapter's tensors together
makes ``delete``/``set_active`` trivial and lets PEFT's per-adapter key names be produced by ``peft_state``.

Subclass protocol (see leantrain/adapters/lora.py for a complete example):

* ``create_adapter(name, config) -> nn.Module`` -- build the module holding this adapter's tensors (parameters
  that train, buffers that do not). Called by ``add_adapter`` after bookkeeping checks.
* ``delta_weight(name) -> Tensor`` -- dense ΔW in the base weight's shape and dtype.
* ``adapter_output(name, x, base_out) -> Tensor`` -- the adapter's additive contribution to the output for
  input ``x``; ``base_out`` is the frozen base layer's output (DoRA needs it).
* ``peft_state(name)`` / ``load_peft_state(name, tensors)`` -- tensors under PEFT's key names, relative to the
  layer (``lora_A.weight``, ``shira_indices``, ...). The default implementation maps
  ``self.adapters[name].state_dict()`` one to one via ``peft_keys`` (own name -> PEFT name).
* Optionally ``merge_one(name)`` / ``unmerge_one(name)`` (defaults add/subtract ``delta_weight``).

Base weight access goes through :func:`base_weight` / :func:`add_to_base_weight` so every adapter also works
on a quantized frozen base (``leantrain.quant.QuantLinear`` exposes ``dequantize()`` and ``add_to_weight()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def base_weight(layer: nn.Module) -> torch.Tensor:
    """Dense weight of a frozen base layer (dequantized when the layer is quantized)."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize()
    return layer.weight


@torch.no_grad()
def add_to_base_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` in place, in W's own dtype (a quantized layer re-quantizes in ``add_to_weight``)."""
    if hasattr(layer, "add_to_weight"):
        layer.add_to_weight(delta)
    else:
        layer.weight.data += delta.to(device=layer.weight.device, dtype=layer.weight.dtype)


@torch.no_grad()
def set_base_weight(layer: nn.Module, value: torch.Tensor) -> None:
    """Replace W (PiSSA writes the residual back). A quantized layer goes through ``add_to_weight``."""
    if hasattr(layer, "add_to_weight"):
        layer.add_to_weight(value.to(torch.float32) - base_weight(layer).to(torch.float32))
    else:
        layer.weight.data.copy_(value.to(device=layer.weight.device, dtype=layer.weight.dtype))


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a base layer: Linear-like via in_features/out_features, Embedding via (num, dim)."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return int(layer.in_features), int(layer.out_features)


class AdapterLayer(nn.Module):
    """Wraps ``base_layer`` and adds the contributions of its active, unmerged adapters to the output."""

    # own sub-module key -> PEFT key (relative to the layer, adapter name removed); subclasses override.
    peft_keys: dict[str, str] = {}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, Any] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ---- shape / attribute pass-through (HF code reads e.g. ``module.weight.dtype``) -----------------------
    @property
    def in_features(self) -> int:
        return layer_shape(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return layer_shape(self.base_layer)[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- subclass hooks ------------------------------------------------------------------------------------
    def create_adapter(self, name: str, config: Any) -> nn.Module:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- adapter bookkeeping -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: Any) -> None:
        if name in self.adapters:
            raise ValueError(
                f"adapter {name!r} already exists on this layer; delete it first or pick another name"
            )
        if self.merged_adapters:
            raise ValueError(
                f"cannot add adapter {name!r} while {self.merged_adapters} are merged; unmerge first"
            )
        module = self.create_adapter(name, config)
        module.train(self.training)  # a new dropout must follow the model's train/eval mode
        self.adapters[name] = module
        self.configs[name] = config
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} on this layer (have {list(self.adapters)})")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.adapters[name]
        del self.configs[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # ---- merge ---------------------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """Fold ΔW of ``names`` (default: the active adapters) into the base weight."""
        names = list(self.active_adapters if names is None else names)
        for name in names:
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r} on this layer (have {list(self.adapters)})")
            if name in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is already merged; unmerge it before merging again")
        for name in names:
            self.merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged ΔW again, newest first (exact up to fp32 round-off)."""
        while self.merged_adapters:
            self.unmerge_one(self.merged_adapters[-1])
            self.merged_adapters.pop()

    def merge_one(self, name: str) -> None:
        add_to_base_weight(self.base_layer, self.delta_weight(name))

    def unmerge_one(self, name: str) -> None:
        add_to_base_weight(self.base_layer, -self.delta_weight(name))

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        base_out = out
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                out = out + self.adapter_output(name, x, base_out).to(out.dtype)
        return out

    # ---- PEFT-format tensors -------------------------------------------------------------------------------
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's key names (relative to the layer)."""
        state = self.adapters[name].state_dict()
        return {self.peft_keys.get(k, k): v for k, v in state.items()}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        """Copy PEFT-named tensors in; every key must exist with the same shape (errors name key + shapes)."""
        own = {self.peft_keys.get(k, k): k for k in self.adapters[name].state_dict()}
        target = self.adapters[name].state_dict(keep_vars=True)
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"{where}: adapter file lacks {', '.join(repr(where + '.' + m) for m in missing)}")
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise KeyError(f"{where}: unexpected key(s) {unexpected} for a {type(self).__name__}")
        for peft_key, own_key in own.items():
            src, dst = tensors[peft_key], target[own_key]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"shape mismatch for {where + '.' + peft_key}: file has {tuple(src.shape)}, "
                    f"model expects {tuple(dst.shape)}"
                )
            with torch.no_grad():
                dst.copy_(src.to(dtype=dst.dtype, device=dst.device))

    def shared_state(self, name: str) -> dict[str, torch.Tensor]:
        """Model-level tensors saved once per adapter (VeRA's projections), keyed under ``base_model.``"""
        return {}

    def load_shared_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        return None

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={self.merged_adapters}"
