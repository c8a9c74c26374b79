"""save/load adapters in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

A leantrain adapter directory loads with ``peft.PeftModel.from_pretrained(model, dir)`` and a PEFT adapter
directory loads with :func:`load`. Tensor keys are PEFT's: ``base_model.model.<module path>.<peft key>`` for
per-layer tensors (``lora_A.weight``, ``lora_magnitude_vector``, ``vera_lambda_b``, ``shira_indices``, ...)
and ``base_model.<key>`` for model-level ones (VeRA's ``vera_A``/``vera_B``). See spec §7 in
/work/shared/methods/lora_family.md.

Config <-> JSON: a config class may define ``to_peft_dict(targets) -> dict`` and a classmethod
``from_peft_dict(d) -> config`` to map its fields onto PEFT's names. Without them the dataclass fields are
written as they are (plus ``peft_type``) and read back by field name, unknown keys ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from .base import AdapterLayer
from .inject import _candidates, _suffix_match, adapter_config, adapter_layers, adapter_names, delete, inject
from .registry import spec_for_config, spec_for_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
LAYER_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
PEFT_VERSION = "0.21.2"  # the PEFT release this format was checked against


def compact_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Short PEFT target list: the distinct last name components when they select exactly ``targets``
    under PEFT's suffix rule, else the full module names (always exact)."""
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    selected = {n for n, _ in _candidates(model) if _suffix_match(n, suffixes)}
    return suffixes if selected == set(targets) else sorted(targets)


def config_to_peft_dict(config: Any, targets: list[str]) -> dict[str, Any]:
    if hasattr(config, "to_peft_dict"):
        body = dict(config.to_peft_dict(targets))
    else:
        body = {k: v for k, v in dataclasses.asdict(config).items()}
        body["target_modules"] = targets
    body["peft_type"] = type(config).peft_type
    body.setdefault("task_type", None)
    body.setdefault("base_model_name_or_path", None)
    body.setdefault("revision", None)
    body.setdefault("inference_mode", True)
    body.setdefault("peft_version", PEFT_VERSION)
    return body


def config_from_peft_dict(values: dict[str, Any]) -> Any:
    """The leantrain config for a PEFT ``adapter_config.json`` dict (unknown peft_type -> ValueError)."""
    if "peft_type" not in values:
        raise ValueError(f"{CONFIG_NAME} has no 'peft_type' key")
    spec = spec_for_peft_type(str(values["peft_type"]))
    cls = spec.config_cls
    if hasattr(cls, "from_peft_dict"):
        return cls.from_peft_dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _layers_of(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    return [(n, layer) for n, layer in adapter_layers(model) if name in layer.adapters]


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """All tensors of adapter ``name`` under PEFT's keys (CPU, contiguous)."""
    layers = _layers_of(model, name)
    state: dict[str, torch.Tensor] = {}
    for layer_name, layer in layers:
        for key, value in layer.peft_state(name).items():
            state[f"{LAYER_PREFIX}{layer_name}.{key}"] = value
    if layers:
        for key, value in layers[0][1].shared_state(name).items():
            state[f"{SHARED_PREFIX}{key}"] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _save_one(model: nn.Module, directory: Path, name: str, pissa_to_lora: bool = False) -> None:
    from safetensors.torch import save_file

    config = adapter_config(model, name)
    targets = [n for n, _ in _layers_of(model, name)]
    state = adapter_state(model, name)
    from .pissa_convert import pissa_to_lora_state, write_initial_factors

    if pissa_to_lora and getattr(config, "changes_base", False):  # PiSSA, LoRA-GA, CorDA
        config, state = pissa_to_lora_state(config, state, _layers_of(model, name), name)
    body = config_to_peft_dict(config, compact_targets(model, targets))
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_initial_factors(directory, config, _layers_of(model, name), name)  # LoRA-GA / CorDA only
    text = json.dumps(body, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def save(
    model: nn.Module, directory: str | Path, name: str | None = None, pissa_to_lora: bool = False
) -> list[str]:
    """Write adapter(s) in PEFT's layout; return the adapter names written.

    ``name`` given: that adapter goes to the root of ``directory`` (loadable by PeftModel.from_pretrained).
    ``name=None``: every adapter; "default" (or a sole adapter) at the root, others in ``directory/<name>/``
    like PEFT's ``save_pretrained``. ``pissa_to_lora``: write PiSSA adapters as rank-2r plain LoRA relative to
    the *original* weights (PEFT's ``path_initial_model_for_weight_conversion``), for any copy of the base.
    """
    directory = Path(directory)
    names = adapter_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no adapters to save; call leantrain.adapters.inject first"
        )
    if name is not None:
        if name not in names:
            raise KeyError(f"model has no adapter named {name!r} (adapters: {names})")
        _save_one(model, directory, name, pissa_to_lora)
        return [name]
    for n in names:
        root = n == "default" or len(names) == 1
        _save_one(model, directory if root else directory / n, n, pissa_to_lora)
    return names


def read_adapter_files(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) of an adapter directory; never unpickles (legacy .bin via weights_only)."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no {CONFIG_NAME}")
    try:
        values = json.loads(config_path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: say which file
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{str(config_path)!r} is not a JSON object (got {type(values).__name__})")  # noqa: TRY004
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(directory / WEIGHTS_NAME))
        except SafetensorError as exc:
            raise ValueError(f"{str(directory / WEIGHTS_NAME)!r} is not a valid safetensors file ({exc})") from None
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        tensors = _load_legacy(directory / LEGACY_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"{str(directory)!r} has no {WEIGHTS_NAME}")
    return values, tensors


def _load_legacy(path: Path) -> dict[str, torch.Tensor]:
    """A legacy ``adapter_model.bin`` as plain tensors (``weights_only``: a pickle with code is refused)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: all mean "refused"
        # torch's weights_only message is many lines; the one naming the offending global / opcode is the useful one
        lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(exc).splitlines()]
        lines = [line for line in lines if line] or [type(exc).__name__]
        reason = next((line for line in lines if line.startswith("Unsupported")), lines[0])
        raise ValueError(f"{str(path)!r}: refused, not a plain tensor file ({reason})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{str(path)!r} is not a dict of named tensors")
    return tensors


def load(
    model: nn.Module, directory: str | Path, name: str = "default", trainable: bool = False
) -> list[str]:
    """Create adapter ``name`` from a PEFT-format directory (wrapping layers as needed) and load its tensors.

    The adapter is frozen unless ``trainable``. Tensors for plain modules (PEFT ``modules_to_save``, e.g. a
    head) are copied into those modules. Shape mismatches raise ValueError naming the key and both shapes;
    keys that fit no module raise KeyError. Returns the wrapped module names. A failed load leaves the model
    as it was: module tree, values and ``requires_grad`` flags (PiSSA's residual base aside).
    """
    from .pissa_convert import read_initial_factors

    values, tensors = read_adapter_files(directory)
    config = config_from_peft_dict(values)
    read_initial_factors(Path(directory), config)  # LoRA-GA / CorDA: rebuild the residual they trained on
    flags = {n: p.requires_grad for n, p in model.named_parameters()}  # inject() freezes everything else
    targets = inject(model, config, name)
    try:
        _load_tensors(model, name, dict(tensors))
    except Exception:
        delete(model, name)
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        raise
    for _, layer in _layers_of(model, name):
        for p in layer.adapters[name].parameters():
            p.requires_grad_(trainable)
    return targets


def _load_tensors(model: nn.Module, name: str, remaining: dict[str, torch.Tensor]) -> None:
    layers = _layers_of(model, name)
    for layer_name, layer in layers:
        prefix = f"{LAYER_PREFIX}{layer_name}."
        mine = {k[len(prefix) :]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
        layer.load_peft_state(name, mine, where=layer_name)
    shared = {
        k[len(SHARED_PREFIX) :]: remaining.pop(k)
        for k in list(remaining)
        if k.startswith(SHARED_PREFIX) and not k.startswith(LAYER_PREFIX)
    }
    layers[0][1].load_shared_state(name, shared)
    _load_plain_modules(model, remaining)


def _load_plain_modules(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy leftover ``base_model.model.<param path>`` tensors (PEFT modules_to_save) into the model.

    Every key and shape is checked before the first copy: these are base-model tensors, which the caller's
    ``delete`` on failure would not restore.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    copies = []
    for key, value in tensors.items():
        path = key.removeprefix(LAYER_PREFIX)
        path = path.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
        if not key.startswith(LAYER_PREFIX) or path not in params:
            raise KeyError(
                f"adapter file key {key!r} fits no adapter layer or parameter of {type(model).__name__}"
            )
        target = params[path]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"shape mismatch for {key}: file has {tuple(value.shape)}, "
                f"model expects {tuple(target.shape)}"
            )
        copies.append((target, value))
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def saved_config(directory: str | Path) -> Any:
    """The leantrain config stored in an adapter directory."""
    return config_from_peft_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))


__all__ = ["adapter_state", "load", "read_adapter_files", "save", "saved_config", "spec_for_config"]
