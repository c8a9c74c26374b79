"""PiSSA / LoRA-GA / CorDA -> plain LoRA, and the initial factors a data init saves beside its adapter.

An init that rewrites W into a residual (``LoraConfig.changes_base``) trains A, B on top of W - s·B0 A0:

the trained model is W + s·(BA - B0 A0) = W + s·[B | -B0][A ; A0]: a LoRA of rank 2r with the same scaling
(r -> 2r, alpha -> 2·alpha, or alpha·√2 for rsLoRA). This mirrors PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)``; see /work/shared/methods/lora_family.md §4 and
https://arxiv.org/abs/2404.02948.

PiSSA's residual is a function of W alone, so loading recomputes it. LoRA-GA's and CorDA's depend on the
calibration data, so ``save`` writes A0, B0 to ``initial_adapter.safetensors`` (PEFT's tensor keys) beside the
adapter, and ``load`` onto the original W rebuilds W - s·B0 A0 from it. PEFT ignores that file and loads the
adapter onto the model it is given, which must then hold the residual (PEFT's own convention for these inits).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write

LAYER_PREFIX = "base_model.model."


def pissa_to_lora_state(
    config: Any, state: dict[str, torch.Tensor], layers: list[tuple[str, Any]], name: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(plain LoRA config, PEFT tensors) equivalent to PiSSA adapter ``name`` on the original base weights."""
    factor = math.sqrt(2) if config.use_rslora else 2.0  # keeps s = alpha/r (or alpha/sqrt(r)) unchanged
    new_config = dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * factor,
        init="default",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )
    out = dict(state)
    for layer_name, layer in layers:
        p = layer.adapters[name]
        if not hasattr(p, "init_A0"):
            raise ValueError(
                f"{layer_name}: adapter {name!r} holds no initial factors (PiSSA/LoRA-GA/CorDA) to convert against"
            )
        a_key, b_key = (
            f"{LAYER_PREFIX}{layer_name}.lora_A.weight",
            f"{LAYER_PREFIX}{layer_name}.lora_B.weight",
        )
        out[a_key] = torch.cat(
            [state[a_key], p.init_A0.detach().cpu().to(state[a_key].dtype)], 0
        ).contiguous()
        out[b_key] = torch.cat(
            [state[b_key], -p.init_B0.detach().cpu().to(state[b_key].dtype)], 1
        ).contiguous()
    return new_config, out


def _keys(layer_name: str) -> tuple[str, str]:
    return f"{LAYER_PREFIX}{layer_name}.lora_A.weight", f"{LAYER_PREFIX}{layer_name}.lora_B.weight"


def write_initial_factors(directory: Path, config: Any, layers: list[tuple[str, Any]], name: str) -> None:
    """A data init's A0, B0 of every layer to ``directory/initial_adapter.safetensors`` (nothing for other inits)."""
    from safetensors.torch import save_file

    from .data_inits import DATA_INITS
    from .lora import INITIAL_NAME

    path = directory / INITIAL_NAME
    params = [(layer_name, layer.adapters[name]) for layer_name, layer in layers]
    if getattr(config, "init", None) not in DATA_INITS or not all(hasattr(p, "init_A0") for _, p in params):
        path.unlink(missing_ok=True)  # none to write (or loaded without them: the base is the residual already)
        return
    state: dict[str, torch.Tensor] = {}
    for layer_name, p in params:
        a_key, b_key = _keys(layer_name)
        state[a_key] = p.init_A0.detach().cpu().contiguous()
        state[b_key] = p.init_B0.detach().cpu().contiguous()
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def read_initial_factors(directory: Path, config: Any) -> None:
    """Give a data-init config read from ``directory`` the initial factors saved there (``config._initial``).

    Without the file ``_initial`` stays empty: the adapter then loads onto W unchanged (PEFT's convention)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .data_inits import DATA_INITS
    from .lora import INITIAL_NAME

    path = Path(directory) / INITIAL_NAME
    if getattr(config, "init", None) not in DATA_INITS or not path.is_file():
        return
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({exc})") from None
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    suffix = ".lora_A.weight"
    for key, a in tensors.items():
        if key.startswith(LAYER_PREFIX) and key.endswith(suffix):
            layer_name = key[len(LAYER_PREFIX):-len(suffix)]
            b = tensors.get(_keys(layer_name)[1])
            if b is None:
                raise ValueError(f"{str(path)!r} has {key} but no lora_B for layer {layer_name!r}")
            initial[layer_name] = (a, b)
    config._initial = initial
