"""Save / load a quantized model: one safetensors file with every tensor + a JSON description of the layers.

Layout of ``dir``:
  * ``quantized.safetensors`` -- the model's full ``state_dict``: for each QuantLinear ``<name>.data`` (packed
    uint8 codes), ``<name>.code`` (fp32 code book), ``<name>.absmax`` or the double-quantized
    ``<name>.absmax_idx/absmax_scale/absmax_offset/absmax_code``, ``<name>.bias`` and, if adapters were merged
    exactly, ``<name>.residual``; every other parameter/buffer (embeddings, norms, head) under its usual key.
  * ``quant_config.json`` -- ``{"format": "leantrain-quant", "version": 1, "layers": {name: {bits, block_size,
    shape, double_quant, weight_dtype, bias, merge_policy}}}``.

Loading needs only a *skeleton*: a module with the same architecture and any weights (randomly initialised,
e.g. ``AutoModel.from_config(config)`` or ``build_classifier("tiny", 3)``), never the original checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write
from .convert import _set_module, quantized_layers
from .functional import ABSMAX_BLOCK, QuantizedTensor, check_bits, check_block_size, code_for_bits
from .linear import MERGE_POLICIES, QuantLinear

WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quant_config.json"
FORMAT = "leantrain-quant"
VERSION = 1
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (with its QuantLinear layers) to ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {"bits": m.bits, "block_size": m.block_size, "shape": [m.out_features, m.in_features],
               "double_quant": m.double_quant, "weight_dtype": str(m.weight_dtype), "bias": m.bias is not None,
               "merge_policy": m.merge_policy}
        for name, m in quantized_layers(model).items()
    }
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        if value.data_ptr() in seen and value.numel():  # tied weights: safetensors refuses shared storage
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value.cpu()
    meta = {"format": FORMAT, "version": VERSION, "layers": layers}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return directory


_LAYER_TYPES = {"bits": int, "block_size": int, "shape": list, "double_quant": bool, "weight_dtype": str,
                "bias": bool}
_UINT8_FIELDS = ("data", "absmax_idx")  # packed / indexed codes; every other field is a float scale or code book


def _read_config(config_path: Path) -> dict:
    """``quant_config.json`` parsed and checked down to every layer entry (ValueError naming file and layer)."""
    try:
        meta = json.loads(config_path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = (f"format={meta.get('format')!r}, version={meta.get('version')!r}" if isinstance(meta, dict)
                 else f"a JSON {type(meta).__name__}")
        raise ValueError(f"{str(config_path)!r} is not a {FORMAT} v{VERSION} file ({found})")
    if not isinstance(meta.get("layers"), dict):  # a malformed file is a ValueError, whatever the JSON type
        raise ValueError(  # noqa: TRY004
            f"{str(config_path)!r}: 'layers' must map module names to layer entries, "
            f"got {type(meta.get('layers')).__name__}")
    for name, info in meta["layers"].items():
        where = f"{str(config_path)!r}: layer {name!r}"
        if not name:
            raise ValueError(f"{where}: empty module name")
        if not isinstance(info, dict):
            raise ValueError(f"{where} must be an object, got {type(info).__name__}")  # noqa: TRY004
        for key, kind in _LAYER_TYPES.items():
            value = info.get(key)
            if key not in info or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                got = repr(value)[:60] if key in info else "nothing"
                raise ValueError(f"{where}: {key!r} must be of type {kind.__name__}, got {got}")
        try:
            check_bits(info["bits"])
            check_block_size(info["block_size"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        shape = info["shape"]
        if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"{where}: 'shape' must be [out_features, in_features], got {shape!r}")
        if info["weight_dtype"] not in _DTYPES:
            raise ValueError(f"{where}: unsupported weight_dtype {info['weight_dtype']!r} (one of {sorted(_DTYPES)})")
        if info.get("merge_policy", "exact") not in MERGE_POLICIES:
            raise ValueError(f"{where}: merge_policy {info['merge_policy']!r} is not one of {MERGE_POLICIES}")
    return meta


def _qweight_from_file(name: str, info: dict, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The stored codes of layer ``name`` (popped from ``tensors``), every field's shape and dtype checked."""
    bits, block_size, shape = info["bits"], info["block_size"], tuple(info["shape"])
    numel = math.prod(shape)
    padded = -(-numel // block_size) * block_size
    n_blocks = padded // block_size
    fields = ["data", "code"] + (["absmax_idx", "absmax_scale", "absmax_offset", "absmax_code"]
                                 if info["double_quant"] else ["absmax"])
    expected = {"data": (padded // 2 if bits == 4 else padded,), "code": (16 if bits == 4 else 255,),
                "absmax": (n_blocks,), "absmax_idx": (-(-n_blocks // ABSMAX_BLOCK) * ABSMAX_BLOCK,),
                "absmax_scale": (-(-n_blocks // ABSMAX_BLOCK),), "absmax_offset": (), "absmax_code": (256,)}
    values = {}
    for field in fields:
        key = f"{name}.{field}"
        if key not in tensors:
            raise KeyError(f"quantized file lacks {key!r}")
        value = tensors.pop(key)
        if tuple(value.shape) != expected[field]:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {expected[field]} for a "
                             f"{bits}-bit weight of shape {shape} with block_size={block_size}")
        if (value.dtype != torch.uint8) if field in _UINT8_FIELDS else not value.is_floating_point():
            raise ValueError(f"{key!r} has dtype {value.dtype}, expected "
                             f"{'torch.uint8' if field in _UINT8_FIELDS else 'a floating-point dtype'}")
        values[field] = value
    if not torch.equal(values["code"], code_for_bits(bits).to(values["code"].device)):
        raise ValueError(f"{name + '.code'!r} is not the {'NF4' if bits == 4 else 'int8'} code book")
    return QuantizedTensor(shape=shape, bits=bits, block_size=block_size, **values)


def _build_layer(name: str, info: dict, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    """A QuantLinear for layer ``name`` from the stored tensors (popped from ``tensors``); touches no model."""
    qweight = _qweight_from_file(name, info, tensors)
    out_features, in_features = info["shape"]
    bias = tensors.pop(f"{name}.bias", None)
    if info["bias"] and bias is None:
        raise KeyError(f"quantized file lacks {name + '.bias'!r}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or not bias.is_floating_point()):
        raise ValueError(f"{name + '.bias'!r} is {bias.dtype} {tuple(bias.shape)}, expected a floating-point "
                         f"({out_features},)")
    residual = tensors.pop(f"{name}.residual", None)
    if residual is not None and (tuple(residual.shape) != (out_features, in_features)
                                 or not residual.is_floating_point()):
        raise ValueError(f"{name + '.residual'!r} is {residual.dtype} {tuple(residual.shape)}, expected a "
                         f"floating-point ({out_features}, {in_features})")
    layer = QuantLinear(qweight, bias, weight_dtype=_DTYPES[info["weight_dtype"]],
                        merge_policy=info.get("merge_policy", "exact"))
    if residual is not None:
        layer.residual = residual
    return layer


def _under(key: str, names: dict) -> bool:
    """Whether state-dict ``key`` belongs to (is a tensor below) one of the modules ``names``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def load_quantized(model: nn.Module, directory: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a :func:`save_quantized` folder into the skeleton ``model`` (in place; also returned).

    The layers listed in ``quant_config.json`` are replaced by QuantLinear built from the stored codes; every
    other tensor is loaded strictly (missing or unexpected keys raise KeyError, wrong shapes ValueError, naming
    them). Everything is checked before the model is touched, so a failed load leaves the skeleton unchanged.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist (not a save_quantized folder?)")
    meta = _read_config(config_path)
    try:
        tensors = load_file(str(weights_path), device=str(device) if device is not None else "cpu")
    except SafetensorError as exc:
        raise ValueError(f"{str(weights_path)!r} is not a valid safetensors file ({exc})") from None
    built: dict[str, QuantLinear] = {}
    for name, info in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"skeleton {type(model).__name__} has no module {name!r} listed in the file") from None
        shape = tuple(info["shape"])
        have = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if have != shape:
            raise ValueError(f"module {name!r} is {have[1]}->{have[0]} in the skeleton, file has {shape[1]}->"
                             f"{shape[0]}")
        built[name] = _build_layer(name, info, tensors)
    # the rest of the file against the skeleton's other tensors, still without touching the skeleton
    rest = {k: v for k, v in model.state_dict().items() if not _under(k, built)}
    bad = [f"size mismatch for {k}: file has {tuple(tensors[k].shape)}, skeleton has {tuple(v.shape)}"
           for k, v in rest.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    # assign=True keeps the file's dtype (a bf16 file stays bf16); an int tensor for a float one is corruption
    bad += [f"dtype mismatch for {k}: file has {tensors[k].dtype}, skeleton has {v.dtype}"
            for k, v in rest.items() if k in tensors and tensors[k].is_floating_point() != v.is_floating_point()]
    if bad:
        raise ValueError(f"{str(weights_path)!r} does not fit the skeleton: {'; '.join(bad)}")
    missing, unexpected = sorted(set(rest) - set(tensors)), sorted(set(tensors) - set(rest))
    if missing or unexpected:
        raise KeyError(f"{str(weights_path)!r} does not fit the skeleton: missing {missing}, unexpected {unexpected}")
    for name, layer in built.items():
        _set_module(model, name, layer)
    model.load_state_dict(tensors, strict=False, assign=True)
    if device is not None:
        model.to(device)
    return model
