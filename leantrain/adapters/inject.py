"""inject(): the single way to put any registered adapter into any nn.Module.

Targets are chosen by ``config.target_modules`` with leantrain's one rule (``leantrain.targets``):
  * a list of names -- PEFT's rule: a module matches when its full name equals the entry or ends with
    ``"." + entry`` (so ``["query", "value"]`` hits every attention block);
  * ``"re:<regex>"`` -- full match of the module name. As in PEFT config objects, any other plain string is a
    regex too (``"query"`` is ``"re:query"``), unlike the comma lists of ``TrainConfig.targets``;
  * ``"all-linear"`` -- every nn.Linear / quantized Linear.
Names and regexes may select any module (the adapter then says whether it can wrap it). ``config.exclude_modules``
removes modules the same way; when it is None the task head (``leantrain.targets.is_head``) is excluded for
"all-linear" and regex targets, never for an explicit list (naming a module explicitly is taken as intent).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..targets import ALL_LINEAR, Targets, name_matches, select, set_submodule
from .base import AdapterLayer
from .registry import is_linear_like, spec_for_config

_set_submodule = set_submodule  # the name leantrain.adapters.multi imports


def _suffix_match(name: str, entries: list[str]) -> bool:
    """PEFT's name rule against several entries (used by leantrain.adapters.io)."""
    return any(name_matches(name, e) for e in entries)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every wrapped layer of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all adapters present in ``model``, in insertion order."""
    seen: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def adapter_config(model: nn.Module, name: str) -> Any:
    """The config an adapter was created with (raises KeyError listing the adapters present)."""
    for _, layer in adapter_layers(model):
        if name in layer.configs:
            return layer.configs[name]
    raise KeyError(f"model has no adapter named {name!r} (adapters: {adapter_names(model)})")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, effective module) for every module not inside a wrapper; a wrapper stands for its base layer."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name)
            out.append((name, module.base_layer))
        else:
            out.append((name, module))
    return out


def _peft_spec(spec: Targets | None) -> Targets | None:
    """A config's targets in leantrain's rule: PEFT means a regex by any plain string except "all-linear"."""
    if isinstance(spec, str) and spec != ALL_LINEAR:
        return "re:" + spec.removeprefix("re:")
    return spec


def resolve_targets(model: nn.Module, target_modules: Targets, exclude_modules: Targets | None = None) -> list[str]:
    """Module names selected by the target/exclude rules above. Unknown list entries raise ValueError."""
    return select(_candidates(model), _peft_spec(target_modules), owner=type(model).__name__,
                  linear=is_linear_like, exclude=_peft_spec(exclude_modules))


def inject(model: nn.Module, config: Any, name: str = "default", calib: Any = None) -> list[str]:
    """Add adapter ``name`` described by ``config`` to ``model`` in place; return the wrapped module names.

    Freezes every parameter except the new adapter's (earlier adapters are frozen too: the newest one
    trains). ``calib`` is handed to ``config.prepare(model, targets, calib)`` when the config defines it.
    All or nothing: if any layer fails, the layers already changed are restored.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    spec = spec_for_config(config)
    if name in adapter_names(model):
        raise ValueError(f"model already has an adapter named {name!r}; delete it or choose another name")
    targets = resolve_targets(model, config.target_modules, getattr(config, "exclude_modules", None))
    plan: list[tuple[str, nn.Module, type]] = []
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        layer_cls = spec.layer_for(base)
        if layer_cls is None:
            raise TypeError(f"{spec.peft_type} cannot wrap module {target!r} of type {type(base).__name__}")
        if isinstance(module, AdapterLayer) and type(module) is not layer_cls:
            raise TypeError(
                f"module {target!r} already holds {type(module).__name__} adapters; "
                "one adapter kind per layer"
            )
        plan.append((target, module, layer_cls))
    prepare = getattr(config, "prepare", None)
    if callable(prepare):
        prepare(model, targets, calib)
    done: list[tuple[str, AdapterLayer, bool]] = []
    try:
        for target, module, layer_cls in plan:
            if isinstance(module, AdapterLayer):
                layer = module
            else:
                layer = layer_cls(module).train(module.training)
            layer.layer_name = target
            layer.add_adapter(name, config)
            if layer is not module:
                set_submodule(model, target, layer)
            done.append((target, layer, layer is not module))
    except Exception:  # all or nothing: undo the layers already changed (a PiSSA residual is not undone)
        for target, layer, wrapped in done:
            layer.delete_adapter(name)
            if wrapped:
                set_submodule(model, target, layer.base_layer)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
    return targets


def trainable_adapter_parameters(model: nn.Module, name: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(full name, parameter) of the adapters' parameters (all adapters, or only ``name``)."""
    out = []
    for layer_name, layer in adapter_layers(model):
        for adapter, module in layer.adapters.items():
            if name is None or adapter == name:
                out.extend((f"{layer_name}.adapters.{adapter}.{k}", p) for k, p in module.named_parameters())
    return out


def delete(model: nn.Module, name: str) -> str | None:
    """Remove adapter ``name`` everywhere; a layer left without adapters is replaced by its base layer.

    PEFT's rule when the deleted adapter was the only active one and others remain: the first remaining adapter
    becomes active, with a warning naming it -- the model never silently runs as its base while it still holds
    adapters. Returns the adapter activated that way (None if the active set did not need to change)."""
    layers = [(n, layer) for n, layer in adapter_layers(model) if name in layer.adapters]
    if not layers:
        raise KeyError(f"model has no adapter named {name!r} (adapters: {adapter_names(model)})")
    was_active = any(name in layer.active_adapters for _, layer in adapter_layers(model))
    for layer_name, layer in layers:
        layer.delete_adapter(name)
        if not layer.adapters:
            set_submodule(model, layer_name, layer.base_layer)
    remaining = adapter_names(model)
    if not was_active or not remaining or any(layer.active_adapters for _, layer in adapter_layers(model)):
        return None
    for _, layer in adapter_layers(model):
        layer.set_active([remaining[0]])
    warnings.warn(f"adapter {name!r} was active and is deleted; adapter {remaining[0]!r} is now active "
                  f"(choose with set_active; adapters left: {remaining})", UserWarning, stacklevel=2)
    return remaining[0]
