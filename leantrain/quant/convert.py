"""Convert a model's linear layers to :class:`QuantLinear` and back, and merge adapters onto a quantized base.

``quantize(model, bits=4)`` is what ``leantrain train --quantize nf4|int8`` calls on the encoder before the
training method injects its adapters (QLoRA, https://arxiv.org/abs/2305.14314: frozen 4-bit base + LoRA).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..targets import of_kind, resolve
from ..targets import set_submodule as _set_module  # also imported under this name by quant/io.py
from .functional import check_bits, check_block_size
from .linear import QuantLinear


def target_linear_names(model: nn.Module, targets: str | Iterable[str] = "all-linear") -> list[str]:
    """Names of the ``nn.Linear`` modules ``targets`` selects (``leantrain.targets`` rule), never a task head:
    a quantized head would be frozen, and the head must stay dense and trainable.

    Names that match nothing raise (a typo would otherwise silently leave the model dense).
    """
    if not isinstance(targets, str):
        targets = list(targets)  # a set or generator is one list of names
    return resolve(model, targets, kind=of_kind(nn.Linear), heads="never", what="nn.Linear")


@torch.no_grad()
def quantize(model: nn.Module, bits: int = 4, targets: str | Iterable[str] = "all-linear",
             double_quant: bool = True, block_size: int = 64, merge_policy: str = "exact") -> list[str]:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by frozen :class:`QuantLinear` in place.

    bits=4 -> NF4, bits=8 -> int8, both block-wise absmax. Returns the converted module names. Heads
    (``classifier``, ``lm_head``, ``score``) are skipped. Already-quantized layers are left alone.
    """
    bits = _checked_bits(bits, block_size)
    names = target_linear_names(model, targets)
    for name in names:
        linear = model.get_submodule(name)
        _set_module(model, name, QuantLinear.from_linear(linear, bits=bits, block_size=block_size,
                                                         double_quant=double_quant, merge_policy=merge_policy))
    return names


def quantizes_before_method(quantize: str | None, init: str | None) -> bool:
    """Whether ``--quantize`` converts the frozen base before the method exists: always, except LoftQ, which
    quantizes after the adapter so that base and adapter approximate the weight jointly."""
    return bool(quantize) and init != "loftq"


def quantize_while_building(bits: int | str = 4, targets: str | Iterable[str] = "all-linear",
                            double_quant: bool = True, block_size: int = 64, merge_policy: str = "exact"):
    """``quantize``'s conversion as a ``meta_init.build_materialised`` hook: each targeted Linear is quantized as
    soon as it holds its values, so the full-precision base never exists at once (the same codes as building
    first and calling ``quantize`` after: quantization draws no random numbers)."""
    bits = _checked_bits(bits, block_size)

    def on_meta(model: nn.Module):
        names = set(target_linear_names(model, targets))

        def replace(name: str, module: nn.Module) -> nn.Module | None:
            if name not in names or not isinstance(module, nn.Linear):
                return None
            return QuantLinear.from_linear(module, bits=bits, block_size=block_size, double_quant=double_quant,
                                           merge_policy=merge_policy)
        return replace
    return on_meta


BITS = {"nf4": 4, "int8": 8}  # --quantize NAME -> bits


def _checked_bits(bits: int | str, block_size: int) -> int:
    if isinstance(bits, str):
        bits = BITS.get(bits.lower(), bits)  # type: ignore[assignment]
    check_bits(bits)
    check_block_size(block_size)
    return bits  # type: ignore[return-value]


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Turn every :class:`QuantLinear` (also inside adapter wrappers) back into a frozen ``nn.Linear``.

    The dense weight is the dequantized codes plus any merged residual, so merged adapters are kept exactly.
    """
    names = list(quantized_layers(model))
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_linear(dtype))
    return names


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (each shared tensor counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.no_grad()
def merge(model: nn.Module, names: list[str] | None = None, how: str = "dense") -> dict[str, dict[str, float]]:
    """Merge adapters into a (partly) quantized base, keeping the adapter's effect.

    Merges through ``leantrain.adapters.merge`` (each :class:`QuantLinear` collects the deltas exactly in its
    fp32 residual), then ``how="dense"`` replaces those layers by dense ``nn.Linear`` (exact, fp32-sized) and
    ``how="requantize"`` folds the residual into new codes (small, lossy: the report gives per layer
    ``lost`` = share of the delta norm not represented, and ``rel_error`` relative to the weight).
    The adapter wrappers stay in place (marked merged), so ``leantrain.adapters.unmerge`` still works
    (exact after ``dense``; after ``requantize`` it subtracts the delta from the re-quantized weight).
    """
    if how not in ("dense", "requantize"):
        raise ValueError(f"how={how!r}; choose 'dense' or 'requantize'")
    from leantrain import adapters  # the adapter core imports nothing from here; keep the dependency one-way

    adapters.merge(model, names)
    if how == "dense":
        return {name: {"lost": 0.0, "rel_error": 0.0} for name in dequantize_model(model)}
    return {name: layer.requantize() for name, layer in quantized_layers(model).items()}
