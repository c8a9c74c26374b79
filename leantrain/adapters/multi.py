"""Model-level adapter operations: merge/unmerge, switching, disabling and combining several adapters.

All functions act on every wrapped layer of the model (``leantrain.adapters.inject`` made them). ``combine``
follows PEFT's ``add_weighted_adapter``: "linear" concatenates the weighted factors (exact: the new ΔW is
Σ wᵢ·ΔWᵢ, rank Σ rᵢ; PEFT's "cat"), "svd" truncates Σ wᵢ·ΔWᵢ to rank r by SVD (PEFT's "svd").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .inject import adapter_config, adapter_layers, adapter_names, inject


def _as_list(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _check_known(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; the model has {known}")


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> list[str]:
    """Fold adapters (default: the active ones) into the base weights in place; return the merged names.

    Raises ValueError when one of them is already merged (merging twice would double ΔW).
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters to merge")
    if names is None:
        wanted = list(dict.fromkeys(n for _, layer in layers for n in layer.active_adapters))
    else:
        wanted = _as_list(names)
        _check_known(model, wanted)
    twice = sorted({n for _, layer in layers for n in layer.merged_adapters if n in wanted})
    if twice:
        raise ValueError(f"adapter(s) {twice} are already merged; call unmerge(model) first")
    if not wanted:
        raise ValueError("no active adapter to merge")
    for _, layer in layers:
        layer.merge([n for n in wanted if n in layer.adapters])
    return wanted


def unmerge(model: nn.Module) -> list[str]:
    """Subtract every merged adapter from the base weights again; return the names that were merged."""
    merged: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        merged.update(dict.fromkeys(layer.merged_adapters))
        layer.unmerge()
    return list(merged)


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` active (their outputs are summed); others stay in memory but are skipped."""
    wanted = _as_list(names)
    _check_known(model, wanted)
    for _, layer in adapter_layers(model):
        if layer.merged_adapters:
            raise ValueError(
                f"cannot switch adapters while {layer.merged_adapters} are merged; unmerge first"
            )
    for _, layer in adapter_layers(model):
        layer.set_active(wanted)


def active_adapters(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for _, layer in adapter_layers(model) for n in layer.active_adapters))


@contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base model inside the block (merged adapters are unmerged and re-merged on exit)."""
    layers = [layer for _, layer in adapter_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])


def combine(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    how: str = "linear",
    r: int | None = None,
) -> list[str]:
    """Add LoRA adapter ``new_name`` with ΔW = Σ weights[i]·ΔW(names[i]) (exact for "linear", rank-``r``
    truncated for "svd"; r defaults to the largest source rank). The new adapter is not activated."""
    from .lora import LoraConfig, LoraEmbedding, LoraLinear

    names = _as_list(names)
    weights = [float(w) for w in weights]
    _check_known(model, names)
    if len(names) != len(weights) or not names:
        raise ValueError(
            f"combine needs one weight per adapter, got {len(names)} names and {len(weights)} weights"
        )
    if how not in ("linear", "svd"):
        raise ValueError(f"combine how={how!r}; choose 'linear' or 'svd'")
    configs = [adapter_config(model, n) for n in names]
    for n, c in zip(names, configs):
        if not isinstance(c, LoraConfig) or c.use_dora:
            raise TypeError(
                f"combine supports plain LoRA adapters only; {n!r} is {type(c).__name__}"
                f"{' with DoRA' if getattr(c, 'use_dora', False) else ''}"
            )
    layers = [(ln, layer) for ln, layer in adapter_layers(model) if any(n in layer.adapters for n in names)]
    if any(not isinstance(layer, (LoraLinear, LoraEmbedding)) for _, layer in layers):
        raise TypeError("combine supports LoRA layers only")
    if any(layer.merged_adapters for _, layer in layers):
        raise ValueError("unmerge before combining adapters")
    ranks = {ln: [layer.adapters[n].r if n in layer.adapters else 0 for n in names] for ln, layer in layers}
    new_r = (
        max(sum(rs) for rs in ranks.values())
        if how == "linear"
        else (r or max(max(rs) for rs in ranks.values()))
    )
    if how == "svd":
        limit = min(min(layer.in_features, layer.out_features) for _, layer in layers)
        if not 0 < new_r <= limit:
            raise ValueError(f"combine r={new_r} must be in [1, {limit}] (smallest layer)")
    # alpha = r gives scaling 1: the factors below already carry each source's scaling and weight.
    config = LoraConfig(r=new_r, alpha=float(new_r), target_modules=[ln for ln, _ in layers], init="default")
    previous = {id(layer): list(layer.active_adapters) for _, layer in layers}
    inject(model, config, new_name)
    with torch.no_grad():
        for ln, layer in layers:
            target = layer.adapters[new_name]
            a_parts, b_parts = [], []
            for n, w in zip(names, weights):
                if n in layer.adapters:
                    p = layer.adapters[n]
                    a_parts.append(p.lora_A.float())
                    b_parts.append(p.lora_B.float() * (w * p.scaling))
            if how == "linear":
                a, b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
                pad = new_r - a.shape[0]
                a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
            else:
                delta = sum(bp @ ap for ap, bp in zip(a_parts, b_parts))
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                a, b = vh[:new_r], u[:, :new_r] * s[:new_r]
            target.lora_A.copy_(a)
            target.lora_B.copy_(b)
            layer.active_adapters = previous[id(layer)]
    return [ln for ln, _ in layers]


def unload(model: nn.Module) -> list[str]:
    """Replace every wrapped layer by its base layer (after ``merge`` this gives a plain model whose
    state_dict matches the original architecture). Unmerged adapters are dropped; returns the unwrapped
    names."""
    from .inject import _set_submodule

    names = [n for n, _ in adapter_layers(model)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).base_layer)
    return names
