"""Build a randomly initialised Hugging Face model directly in its training dtype, with no full-size fp32 copy.

An eager ``LlamaForCausalLM(config)`` in fp32 holds 4 bytes per weight (27 GB at 7B) before ``--dtype bf16`` could
halve it. Here the model is constructed on the meta device (no memory), then each module is materialised on its
own: its fp32 values are drawn, then cast to the target dtype, so the transient fp32 memory is one module.

The values are the eager build's, bit for bit (cast to the dtype): the CPU generator is replayed in the order the
eager build consumes it. That order, for transformers' models, is: each torch layer's own ``reset_parameters``
while it is constructed (kaiming/normal draws that are later overwritten, but they advance the generator), and a
``PreTrainedModel``'s ``post_init`` at the end of its own construction, which re-initialises, children first,
every module not initialised yet with ``_init_weights``. A sub-model (``LlamaModel`` inside ``LlamaForCausalLM``)
therefore initialises itself before its parent's later layers (``lm_head``) are even constructed.
``tests/test_meta_init.py`` checks the equality against the eager constructor.

``convert`` replaces a module as soon as it holds its values (``--quantize``: a Linear becomes its NF4/int8 form),
so a quantized base never exists in full precision either; conversion draws nothing from the generator.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

BUILT = "_leantrain_materialised"
Convert = Callable[[str, nn.Module], "nn.Module | None"]  # (qualified name, materialised module) -> replacement


def build_materialised(factory: Callable[[], nn.Module], dtype: torch.dtype, seed: int,
                       convert: Callable[[nn.Module], Convert | None] | None = None) -> nn.Module:
    """``factory()`` built on meta and materialised on CPU in ``dtype``, with the values of a seeded eager build.

    ``convert(meta_model)`` may return a function that is given each module once it is materialised and returns
    its replacement (or None to keep it); it sees the whole model first, on meta, to resolve names.
    """
    with torch.device("meta"):
        model = factory()
    replace = convert(model) if convert is not None else None
    torch.manual_seed(seed)
    _construct(model, dtype, replace or _keep, "")
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"meta init: {type(model).__name__} left {leftover[0]} (and {len(leftover) - 1} more) "
                           "uninitialised; build it with --dtype fp32")
    return model


def _is_pretrained(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _keep(name: str, module: nn.Module) -> None:
    return None


def _construct(module: nn.Module, dtype: torch.dtype, replace: Convert, prefix: str) -> None:
    """Replay the generator draws of constructing ``module`` (and, for a PreTrainedModel, its ``post_init``)."""
    if not _is_pretrained(module):
        _draw_constructor_init(module)
    for name, child in module.named_children():
        _construct(child, dtype, replace, f"{prefix}{name}.")
    if _is_pretrained(module):
        _initialise(module, module, dtype, replace, prefix)


def _draw_constructor_init(module: nn.Module) -> None:
    """Advance the generator as the layer's own constructor did, on a throwaway fp32 copy of its own tensors."""
    if not hasattr(module, "reset_parameters") or not any(True for _ in module.parameters(recurse=False)):
        return
    scratch = copy.deepcopy(module)
    for name, child in list(scratch.named_children()):
        setattr(scratch, name, nn.Identity())
    scratch.to_empty(device="cpu", recurse=False)
    scratch.reset_parameters()


@torch.no_grad()
def _initialise(owner: nn.Module, module: nn.Module, dtype: torch.dtype, replace: Convert, prefix: str) -> None:
    """``owner._init_weights`` on every not yet materialised module below ``module``, children first (post_init);
    each child is offered to ``replace`` right after it is complete."""
    for name, child in list(module.named_children()):
        _initialise(owner, child, dtype, replace, f"{prefix}{name}.")
        if getattr(child, BUILT, False):
            new = replace(f"{prefix}{name}", child)
            if new is not None:
                setattr(new, BUILT, True)
                setattr(module, name, new)
    if getattr(module, BUILT, False):
        return
    if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
        module.to_empty(device="cpu", recurse=False)
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.is_floating_point():
                t.fill_(float("nan"))  # anything _init_weights does not write is caught below
        owner._init_weights(module)
        _check_written(module)
        _cast_own(module, dtype)
    setattr(module, BUILT, True)


def _check_written(module: nn.Module) -> None:
    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise RuntimeError(f"meta init: {type(module).__name__}.{name} is not written by _init_weights; "
                               "build this model with --dtype fp32")


def _cast_own(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast this module's own floating parameters once they hold their fp32 values; buffers (rotary frequencies)
    stay fp32, as transformers keeps them in a model loaded in bf16 (``precision.cast_model`` does the same)."""
    if dtype == torch.float32:
        return
    for name, param in module.named_parameters(recurse=False):
        if param.is_floating_point():
            module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
