"""Sharded checkpoints of FSDP2 runs with torch.distributed.checkpoint (DCP): every rank writes its own shards.

``RUN/checkpoints/step-N/`` of an FSDP2 run holds ``dcp/`` (DCP's ``.metadata`` and one ``__<rank>_0.distcp``
per writing rank: the method's trainable tensors and the optimizer state), ``optimizer.json`` (param groups with
parameter names, non-tensor state), ``trainer.json`` / ``trainer.safetensors`` and the sha256 manifest, made
atomic the same way as a one-process checkpoint (``checkpoint.finalize``). No rank gathers the full state: a
DTensor is written as its local shard; leantrain's block-wise optimizer state is first rewritten in a layout that
does not depend on the number of processes (``optim/logical_state.py``), so DCP re-shards it on load for any
number of processes, one included (``leantrain train --resume`` without torchrun), exactly.

DCP's ``.metadata`` is a pickle written by torch; it is read here by an unpickler that only builds DCP's own
metadata classes and torch sizes/dtypes, after the manifest's sha256 check.
"""
from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .methods import checkpoint_contents

if TYPE_CHECKING:
    from .run import Run

DIR = "dcp"


# --- which optimizers --------------------------------------------------------------------------------------------

def _block_optimizer(opt: Any) -> bool:
    from .optim.adam import BlockOptimizer

    return isinstance(opt, BlockOptimizer)


def unsupported_reason(opt: Any) -> str | None:
    """Why ``opt``'s state cannot go into a sharded checkpoint (None: it can)."""
    inner = getattr(opt, "inner", None)  # wrappers (DLRT's KLS integrator) answer for the optimizer they drive
    if inner is not None and inner is not opt:
        return unsupported_reason(inner)
    if _block_optimizer(opt):
        from .optim.adam import BlockOptimizer

        if type(opt)._update is not BlockOptimizer._update:
            return f"{type(opt).__name__} keeps its own per-shard state layout"
        return None
    if not isinstance(opt, torch.optim.Optimizer):
        return f"{type(opt).__name__} is not a torch optimizer"
    return None


# --- save ---------------------------------------------------------------------------------------------------------

def _names(run: Run) -> dict[int, str]:
    return {id(p): n for n, p in run.model.named_parameters()}


def run_state(run: Run) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors for DCP, JSON-able rest) of the method's trainable state and the optimizer (a collective)."""
    model = checkpoint_contents(run.method, run.model)
    tensors: dict[str, Tensor] = {f"model/{k}": v for k, v in model.items()}
    opt, names = run.optimizer, _names(run)
    groups, extra = [], {}
    for group in opt.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            if _block_optimizer(opt):
                from .optim.logical_state import to_logical
                state = to_logical(opt, p, group, state)
            name = names[id(p)]
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{name}/{key}"] = value
                else:
                    extra.setdefault(name, {})[key] = value
    layout = {"moments": [name for name, _ in opt.moments]} if _block_optimizer(opt) else None
    return tensors, {"param_groups": _jsonable(groups), "state": extra, "block_layout": layout}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item()
    return value


def save(run: Run, folder: Path) -> None:
    """Every rank writes its shards into ``folder/dcp``; rank 0 also writes ``optimizer.json``."""
    import torch.distributed.checkpoint as dcp

    tensors, rest = run_state(run)
    dcp.save(tensors, checkpoint_id=str(folder / DIR))
    if run.ctx.is_main:
        (folder / "optimizer.json").write_text(json.dumps(rest))


# --- load ---------------------------------------------------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes, dtypes and layouts, and paths -- nothing that runs code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
               ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        allowed = ((module, name) in self.ALLOWED or module == "torch.distributed.checkpoint.metadata"
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which leantrain does not load")
        return super().find_class(module, name)


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            data = (Path(self.path) / ".metadata").read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _dcp_load(target: dict[str, Tensor], path: Path) -> None:
    """DCP's load, in one process when no process group exists (without its warning that says so)."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=_reader(path / DIR), no_dist=single)


def saved_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (global shape, dtype) of every tensor in the checkpoint's ``dcp/`` folder."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _reader(path / DIR).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _param_entries(run: Run, flat: dict[str, Any]) -> Iterator[tuple[dict, Tensor, str, dict[str, Any]]]:
    """(group, parameter, name, its entries of ``flat`` without the ``optim/<name>/`` prefix) for every parameter
    of the run's optimizer that has entries."""
    names = _names(run)
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            prefix = f"optim/{names[id(p)]}/"
            mine = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            if mine:
                yield group, p, names[id(p)], mine


def _optimizer_template(run: Run, saved: dict) -> dict[str, Tensor]:
    opt = run.optimizer
    out: dict[str, Tensor] = {}
    for group, p, name, mine in _param_entries(run, saved):
        if _block_optimizer(opt):
            from .optim.logical_state import template
            part = template(opt, p, group, mine)
        else:  # torch optimizers: per-element state is laid out like the parameter, scalars replicated
            part = {k: torch.empty_like(p) if shape == tuple(p.shape) and hasattr(p, "to_local")
                    else torch.empty(shape, dtype=dtype) for k, (shape, dtype) in mine.items()}
        out.update({f"optim/{name}/{k}": v for k, v in part.items()})
    return out


def load(run: Run, path: Path) -> dict[str, Tensor]:
    """Load ``path`` (a DCP checkpoint folder) into ``run``'s optimizer; return the method's trainable tensors
    (sharded like the current model) for the caller to apply. Works with any number of processes."""

    from .checkpoint import CheckpointError

    saved = saved_tensors(path)
    current = checkpoint_contents(run.method, run.model)
    missing = sorted(k for k in current if f"model/{k}" not in saved)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the model tensor {missing[0]!r}")
    target = {f"model/{k}": torch.empty_like(v) for k, v in current.items()}
    target.update(_optimizer_template(run, saved))
    for key, value in target.items():
        shape = saved[key][0]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {path}: tensor {key!r} has shape {shape}, the run expects "
                                  f"{tuple(value.shape)}")
    _dcp_load(target, path)
    _apply_optimizer(run, target, json.loads((path / "optimizer.json").read_text()))
    return {k[len("model/"):]: v for k, v in target.items() if k.startswith("model/")}


def _apply_optimizer(run: Run, loaded: dict[str, Tensor], rest: dict[str, Any]) -> None:
    opt = run.optimizer
    saved_groups = rest["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        from .checkpoint import CheckpointError
        raise CheckpointError(f"the checkpoint has {len(saved_groups)} optimizer param groups, the run "
                              f"{len(opt.param_groups)}")
    for group, saved in zip(opt.param_groups, saved_groups):  # hyperparameters: the checkpoint's (as torch's)
        keep_compile = group.get("compile")
        group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v)
                      for k, v in saved.items() if k != "params"})
        if keep_compile is not None:  # how to run is this process's choice, not state
            group["compile"] = keep_compile
    for group, p, name, state in _param_entries(run, loaded):
        if _block_optimizer(opt):
            from .optim.logical_state import from_logical
            state = from_logical(opt, p, group, state)
            if "step" in state:
                state["step"] = state["step"].to("cpu", torch.float32)
        state.update(rest["state"].get(name, {}))
        opt.state[p] = state


def load_full_into_shards(run: Run, opt_state: dict) -> None:
    """A one-process ``optimizer.state_dict()`` into an FSDP2 run: each rank keeps its shard's part (1 -> N)."""
    opt = run.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in opt_state["param_groups"] for i in g["params"]]
    if len(ids) != len(params):
        from .checkpoint import CheckpointError
        raise CheckpointError(f"the checkpoint's optimizer holds {len(ids)} parameters, the run {len(params)}")
    for group, saved in zip(opt.param_groups, opt_state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k not in ("params", "compile")})
    by_param = dict(zip((id(p) for p in params), ids))
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt_state["state"].get(by_param[id(p)])
            if not state:
                continue
            if _block_optimizer(opt):
                from .optim.logical_state import localize_full
                state = localize_full(opt, p, group, {k: (v.clone() if isinstance(v, Tensor) else v)
                                                      for k, v in state.items()})
            else:
                state = {k: _shard_like(v, p) for k, v in state.items()}
            opt.state[p] = state


def _shard_like(value: Any, p: Tensor) -> Any:
    """A full per-element state tensor of a torch optimizer as a DTensor laid out like ``p``."""
    if isinstance(value, Tensor) and hasattr(p, "to_local") and tuple(value.shape) == tuple(p.shape):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
    return value


def to_single(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model tensors, ``optimizer.state_dict()``) of a DCP checkpoint as one process would hold them, read
    without building the model (``leantrain checkpoint convert``)."""

    target = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in saved_tensors(path).items()}
    _dcp_load(target, path)
    rest = json.loads((path / "optimizer.json").read_text())
    model = {k[len("model/"):]: v for k, v in target.items() if k.startswith("model/")}
    layout = rest.get("block_layout")
    ids, groups = {}, []
    for group in rest["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    state: dict[int, dict[str, Any]] = {}
    for key, value in target.items():
        if key.startswith("optim/"):
            name, _, sub = key[len("optim/"):].rpartition("/")
            state.setdefault(ids[name], {}).update(_single_entry(sub, value, layout))
    for name, extra in rest["state"].items():
        state.setdefault(ids[name], {}).update(extra)
    return model, {"state": state, "param_groups": groups}


def _single_entry(key: str, value: Tensor, layout: dict | None) -> dict[str, Tensor]:
    """One logical state tensor in one process's run-time layout (block-wise state is flat, 4-bit packed)."""
    from .optim import quant
    from .optim.logical_state import UNPACKED

    if layout is None:
        return {key: value}
    if key.endswith(UNPACKED):
        return {key[:-len(UNPACKED)] + "_codes": quant.pack_4bit(value.reshape(-1))}
    base = key.rpartition("_")[0] if key.endswith(("_codes", "_absmax")) else key
    return {key: value.reshape(-1) if base in layout["moments"] else value}
