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
from .linear import QuantLinear

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


def _qweight_from_file(name: str, info: dict, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    bits, block_size, shape = info["bits"], info["block_size"], tuple(info["shape"])
    check_bits(bits)
    check_block_size(block_size)
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
        values[field] = value
    if not torch.equal(values["code"], code_for_bits(bits)):
        raise ValueError(f"{name + '.code'!r} is not the {'NF4' if bits == 4 else 'int8'} code book")
    return QuantizedTensor(shape=shape, bits=bits, block_size=block_size, **values)


def load_quantized(model: nn.Module, directory: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a :func:`save_quantized` folder into the skeleton ``model`` (in place; also returned).

    The layers listed in ``quant_config.json`` are replaced by QuantLinear built from the stored codes; every
    other tensor is loaded strictly (missing or unexpected keys raise, naming them).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist (not a save_quantized folder?)")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{str(config_path)!r} is not a {FORMAT} v{VERSION} file "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    try:
        tensors = load_file(str(weights_path), device=str(device) if device is not None else "cpu")
    except SafetensorError as exc:
        raise ValueError(f"{str(weights_path)!r} is not a valid safetensors file ({exc})") from None
    for name, info in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise KeyError(f"skeleton {type(model).__name__} has no module {name!r} listed in the file") from exc
        shape = tuple(info["shape"])
        have = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if have != tuple(shape):
            raise ValueError(f"module {name!r} is {have[1]}->{have[0]} in the skeleton, file has {shape[1]}->"
                             f"{shape[0]}")
        qweight = _qweight_from_file(name, info, tensors)
        bias = tensors.pop(f"{name}.bias", None)
        if info["bias"] and bias is None:
            raise KeyError(f"quantized file lacks {name + '.bias'!r}")
        dtype = _DTYPES.get(info["weight_dtype"])
        if dtype is None:
            raise ValueError(f"{name!r}: unsupported weight_dtype {info['weight_dtype']!r} in {CONFIG_FILE}")
        layer = QuantLinear(qweight, bias, weight_dtype=dtype, merge_policy=info.get("merge_policy", "exact"))
        residual = tensors.pop(f"{name}.residual", None)
        if residual is not None:
            layer.residual = residual
        _set_module(model, name, layer)
    quant_keys = {k for k in model.state_dict() if k.rpartition(".")[0] in meta["layers"]}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches: torch's message is multi-line, keep it on one line
        raise ValueError(f"{str(weights_path)!r} does not fit the skeleton: "
                         + " ".join(line.strip() for line in str(exc).splitlines()[1:])) from None
    missing = [k for k in missing if k not in quant_keys]
    if missing or unexpected:
        raise KeyError(f"{str(weights_path)!r} does not fit the skeleton: missing {missing}, unexpected {unexpected}")
    if device is not None:
        model.to(device)
    return model
