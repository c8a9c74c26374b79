"""leantrain.adapters: parameter-efficient adapters (LoRA family, VeRA, SHiRA, MiSS) in PEFT's file format.

One obvious path::

    from leantrain import adapters
    adapters.inject(model, adapters.LoraConfig(r=8, alpha=16, target_modules="all-linear"))  # base frozen
    ...train...
    adapters.save(model, "out/adapter")          # adapter_config.json + adapter_model.safetensors (PEFT)
    adapters.load(model2, "out/adapter")         # or peft.PeftModel.from_pretrained(model2, "out/adapter")
    adapters.merge(model); adapters.unmerge(model)

See docs/adapters.md for multi-adapter use (set_active, disable, combine, delete).
"""

from __future__ import annotations

from typing import Any

from .base import AdapterLayer, add_to_base_weight, base_weight
from .inject import adapter_config, adapter_layers, adapter_names, delete, inject, resolve_targets
from .io import load, save, saved_config
from .lora import LoraConfig
from .multi import active_adapters, combine, disable, merge, set_active, unload, unmerge
from .registry import register_adapter
from .vera import VeraConfig

__all__ = [
    "AdapterLayer",
    "LoraConfig",
    "MissConfig",
    "ShiraConfig",
    "VeraConfig",
    "active_adapters",
    "adapter_config",
    "adapter_layers",
    "adapter_names",
    "add_to_base_weight",
    "base_weight",
    "combine",
    "delete",
    "disable",
    "inject",
    "load",
    "merge",
    "register_adapter",
    "resolve_targets",
    "save",
    "saved_config",
    "set_active",
    "unload",
    "unmerge",
]

_LAZY = {"ShiraConfig": ".shira", "MissConfig": ".miss"}


def __getattr__(name: str) -> Any:
    """ShiraConfig / MissConfig live in modules written separately; import them on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
