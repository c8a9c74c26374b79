"""Adapter registry: config dataclass <-> layer class, looked up by ``type(config)`` or PEFT's ``peft_type``.

A method file ends with one ``register_adapter(XConfig, XLayer)`` line. PEFT files name their method by
``peft_type`` ("LORA", "VERA", ...); ``spec_for_peft_type`` imports the method's module on first use, so
loading a SHiRA adapter works without the caller importing leantrain.adapters.shira first. An extra layer
class may be given as a ``"module:attr"`` string, imported when a module of that type is first wrapped: a
layer file that builds on its method's file (``lora_conv`` on ``lora``) is then not imported back by it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# peft_type -> module that registers it (imported lazily).
KNOWN_MODULES: dict[str, str] = {
    "LORA": "leantrain.adapters.lora",
    "VERA": "leantrain.adapters.vera",
    "SHIRA": "leantrain.adapters.shira",
    "MISS": "leantrain.adapters.miss",
    "LOLDU": "leantrain.adapters.loldu",
}


LayerRef = type | str  # a layer class, or "package.module:ClassName" imported on first use


def resolve_layer(ref: LayerRef) -> type:
    """The class a ``LayerRef`` names (importing its module the first time a string is resolved)."""
    if isinstance(ref, type):
        return ref
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@dataclass
class AdapterSpec:
    peft_type: str
    config_cls: type
    layer_cls: type  # wraps nn.Linear and Linear-like modules (in_features/out_features/dequantize)
    extra_layers: dict[type, LayerRef] = field(default_factory=dict)  # e.g. {nn.Embedding: LoraEmbedding}

    def layer_for(self, module: nn.Module) -> type | None:
        """The wrapper class for ``module``, or None when this method does not support its type."""
        for module_type, layer_cls in self.extra_layers.items():
            if isinstance(module, module_type):
                return resolve_layer(layer_cls)
        if is_linear_like(module):
            return self.layer_cls
        return None


ADAPTERS: dict[str, AdapterSpec] = {}


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a module that quacks like one and can be dequantized (leantrain.quant.QuantLinear)."""
    if isinstance(module, nn.Linear):
        return True
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantize"))


def register_adapter(config_cls: type, layer_cls: type, extra_layers: dict[type, LayerRef] | None = None) -> None:
    """Register a method; ``config_cls.peft_type`` is its key. Registering a type twice raises KeyError."""
    peft_type = getattr(config_cls, "peft_type", None)
    if not isinstance(peft_type, str) or not peft_type:
        raise TypeError(f"{config_cls.__name__} needs a class attribute peft_type (e.g. 'LORA')")
    existing = ADAPTERS.get(peft_type)
    if existing is not None and existing.config_cls is not config_cls:
        raise KeyError(f"adapter type {peft_type!r} is already registered by {existing.config_cls.__name__}")
    ADAPTERS[peft_type] = AdapterSpec(peft_type, config_cls, layer_cls, dict(extra_layers or {}))


def spec_for_config(config: Any) -> AdapterSpec:
    for spec in ADAPTERS.values():
        if type(config) is spec.config_cls:
            return spec
    peft_type = getattr(config, "peft_type", None)
    if isinstance(peft_type, str) and peft_type in KNOWN_MODULES:
        return spec_for_peft_type(peft_type)
    raise TypeError(f"{type(config).__name__} is not a registered adapter config (known: {sorted(ADAPTERS)})")


def spec_for_peft_type(peft_type: str) -> AdapterSpec:
    if peft_type not in ADAPTERS and peft_type in KNOWN_MODULES:
        importlib.import_module(KNOWN_MODULES[peft_type])
    if peft_type not in ADAPTERS:
        known = sorted(set(ADAPTERS) | set(KNOWN_MODULES))
        raise ValueError(f"unknown adapter peft_type {peft_type!r}; leantrain supports: {', '.join(known)}")
    return ADAPTERS[peft_type]
