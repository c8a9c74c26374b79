"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

Layout of ``RUN/checkpoints/step-000100/``: ``model.safetensors`` (the method's trainable state),
``optimizer.safetensors`` + ``optimizer.json`` (optimizer state_dict split into tensors and the rest),
``trainer.json`` (step, metrics so far) + RNG states inside ``trainer.safetensors``, and ``manifest.json`` with
the sha256 of every file. A checkpoint is written to a temporary folder, fsynced, then renamed into place, and
``RUN/checkpoints/latest`` (a one-line file) is replaced atomically last; a folder without a valid manifest is
torn and is never loaded. The previous checkpoint is kept until a newer one is complete.

The second half saves and restores a whole run (``run.Run``): the method's trainable state, the optimizer state in
one of two formats -- ``index`` (``optimizer.state_dict()``, one process or DDP) or ``fqn`` (the full state keyed
by parameter names, gathered from FSDP2 shards) -- and the RNG state, so a resumed run continues bit-exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import dist
from .atomic import atomic_write, follow_umask, temp_dir, write_text_atomic
from .methods import checkpoint_contents

if TYPE_CHECKING:
    from .run import Run

KEEP = 2  # complete checkpoints kept on disk
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.safetensors",
                  "trainer.json")
DCP_REQUIRED_FILES = ("dcp/.metadata", "optimizer.json", "trainer.safetensors", "trainer.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, torn or does not match the model it is loaded into."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(_contiguous(tensors), tmp, metadata=metadata))


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or non-contiguous storage: copy only the tensors that have either (a second
    copy of every tensor would double a 7B model's 13 GB while saving)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


# --- optimizer state <-> (tensors, json) ----------------------------------------------------------------------

def split_state_dict(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict()`` into flat tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return {"__list__" if isinstance(value, list) else "__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"optimizer state entry {key!r} has type {type(value).__name__}; only tensors and numbers "
                        "can be checkpointed")

    return tensors, walk(state, "s")


def join_state_dict(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    def build(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                key = node["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"optimizer checkpoint lacks tensor {key!r}")
                return tensors[key]
            if "__dict__" in node:
                return {build(k): build(v) for k, v in node["__dict__"]}
            if "__list__" in node:
                return [build(v) for v in node["__list__"]]
            if "__tuple__" in node:
                return tuple(build(v) for v in node["__tuple__"])
        return node

    return build(tree)


# --- whole checkpoints ------------------------------------------------------------------------------------------

def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict[str, Any], rng: dict[str, torch.Tensor]) -> Path:
    """Write ``step-N`` atomically, point ``latest`` at it, and prune older complete checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, f".tmp-step-{step:07d}-")

    def write() -> None:
        save_file(_contiguous(model_state), tmp / "model.safetensors")
        opt_tensors, opt_tree = split_state_dict(optimizer_state)
        save_file(_contiguous(opt_tensors), tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_tree))
        write_trainer_files(tmp, step, trainer_state, rng)

    return finalize(run_dir, tmp, step, write)


def write_trainer_files(folder: Path, step: int, trainer_state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    save_file(_contiguous(rng), folder / "trainer.safetensors")
    (folder / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))


def finalize(run_dir: Path, tmp: Path, step: int, write: Any, fmt: str | None = None) -> Path:
    """Run ``write()`` (fills ``tmp``), then add the manifest, fsync, rename ``tmp`` to ``step-N``, point
    ``latest`` at it and prune; on failure ``tmp`` is removed and the previous checkpoint stays."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    try:
        write()
        follow_umask(tmp)  # safetensors' save_file makes 0600 files
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "files": {p.relative_to(tmp).as_posix(): _digest(p) for p in files}}
        if fmt:
            manifest["format"] = fmt
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for p in [*files, tmp / "manifest.json"]:
            with p.open("rb") as handle:
                os.fsync(handle.fileno())
        for folder in {p.parent for p in files} | {tmp}:
            _fsync_dir(folder)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"; {previous} is intact" if previous else ""
        raise CheckpointError(f"writing checkpoint step {step} to {root} failed ({exc}){kept}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name + "\n")
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    return root / pointer.read_text().strip()


def verify_checkpoint(path: Path) -> dict:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt ({exc.msg})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    required = DCP_REQUIRED_FILES if isinstance(manifest, dict) and manifest.get("format") == "dcp" \
        else REQUIRED_FILES
    if not isinstance(files, dict) or not set(required) <= set(files):
        raise CheckpointError(f"checkpoint {path}: manifest.json does not list {', '.join(required)}")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _digest(file) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 mismatch)")
    return manifest


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any], dict[str, torch.Tensor]]:
    """Return (model_state, optimizer_state, trainer_state, rng) after verifying every file's digest."""
    manifest = verify_checkpoint(path)
    try:
        model_state = load_file(path / "model.safetensors")
        opt_state = join_state_dict(load_file(path / "optimizer.safetensors"),
                                    json.loads((path / "optimizer.json").read_text()))
    except (SafetensorError, OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    trainer, rng = load_trainer_files(path, manifest)
    return model_state, opt_state, trainer, rng


def load_trainer_files(path: Path, manifest: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer.json, RNG state) of a verified checkpoint of either format; the step must match the manifest's."""
    try:
        rng = load_file(path / "trainer.safetensors")
        trainer = json.loads((path / "trainer.json").read_text())
    except (SafetensorError, OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int) or "cpu" not in rng:
        raise CheckpointError(f"checkpoint {path}: trainer.json / trainer.safetensors lack the step or RNG state")
    if manifest.get("step") != trainer["step"]:
        raise CheckpointError(f"checkpoint {path}: manifest.json step {manifest.get('step')!r} does not match "
                              f"trainer.json step {trainer['step']}")
    return trainer, rng


def previous_checkpoint(path: Path) -> Path | None:
    older = sorted(p for p in path.parent.glob("step-*") if p.is_dir() and p.name < path.name)
    return older[-1] if older else None


# --- a run's state: what `leantrain train` saves and resumes -----------------------------------------------------

def rng_state() -> dict[str, torch.Tensor]:
    """CPU and CUDA generator states: dropout continues on a resumed run exactly where it stopped."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(run: Run) -> dict[str, torch.Tensor]:
    """The method's checkpoint contents (its ``trainable_state`` hook, else trainable params + buffers).

    Under FSDP a collective (every rank calls it): shards are gathered, and copied at once because FSDP frees
    unsharded storage behind our back."""
    state = checkpoint_contents(run.method, run.model)
    return {k: dist.full_tensor(v).detach().clone() if run.fsdp else v for k, v in state.items()}


def optimizer_state(run: Run) -> dict:
    """The ``index`` format: ``optimizer.state_dict()`` (one process or DDP; FSDP2 runs save with DCP)."""
    return run.optimizer.state_dict()


def refuse_unsaveable(run: Run) -> None:
    """Fail before the run starts if it would have to save optimizer state that cannot be saved."""
    cfg = run.cfg
    if not (run.fsdp and (cfg.save_every or cfg.stop_at or cfg.resume)):
        return
    from .dcp_checkpoint import unsupported_reason

    reason = unsupported_reason(run.optimizer)
    if reason:
        raise ValueError(f"--strategy fsdp with --optim {cfg.optim}: its state cannot be saved in a sharded "
                         f"checkpoint ({reason}); use --strategy ddp or drop --save-every/--stop-at/--resume")


def save_run(run: Run, run_dir: Path, step: int, started: float) -> None:
    """Checkpoint ``step`` (``started``: the invocation's start time, for ``wall_time``). Every rank calls it."""
    trainer = {"wall_time": time.time() - started, "world_size": run.ctx.world,
               "optimizer_format": "dcp" if run.fsdp else "index"}
    if run.scaler is not None:  # fp16 mixed precision: the loss scale and its growth counter
        trainer["loss_scaler"] = run.scaler.state_dict()
    if run.fsdp:
        _save_sharded(run, run_dir, step, trainer)
        return
    model_state, opt_state = trainable_state(run), optimizer_state(run)
    if run.ctx.is_main:
        save_checkpoint(run_dir, step, model_state, opt_state, trainer, rng_state())
    if run.ctx.enabled:
        torch.distributed.barrier()


def _save_sharded(run: Run, run_dir: Path, step: int, trainer: dict[str, Any]) -> None:
    """FSDP2: every rank writes its shards with DCP into one temporary folder that rank 0 then seals."""
    from . import dcp_checkpoint

    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step:07d}-dcp"
    if run.ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()
    dcp_checkpoint.save(run, tmp)
    torch.distributed.barrier()
    if run.ctx.is_main:
        finalize(run_dir, tmp, step, lambda: write_trainer_files(tmp, step, trainer, rng_state()), fmt="dcp")
    torch.distributed.barrier()


def restore_run(run: Run, run_dir: Path) -> int:
    """Load the latest checkpoint of ``run_dir`` into ``run`` (model, optimizer, RNG); returns its step."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint (was --save-every set?)")
    if _declared_format(path) == "dcp":
        from . import dcp_checkpoint

        trainer, rng = load_trainer_files(path, _naming_fallback(path, verify_checkpoint))
        model_state, opt_state = dcp_checkpoint.load(run, path), None
    else:
        model_state, opt_state, trainer, rng = _load_naming_fallback(path)
    hook = getattr(run.method, "load_trainable_state", None)
    if hook:
        hook(run.model, model_state)
    else:
        load_trainable(run.model, model_state)
    if opt_state is not None:
        _load_optimizer(run, opt_state, trainer)
    set_rng_state(rng)
    if run.scaler is not None and "loss_scaler" in trainer:
        run.scaler.load_state_dict(trainer["loss_scaler"])
    return trainer["step"]


def _declared_format(path: Path) -> str:
    """"dcp" if the manifest says so (read, not verified: each format's loader verifies every file once)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "safetensors"  # the loader reports the missing or corrupt manifest
    return manifest.get("format", "safetensors") if isinstance(manifest, dict) else "safetensors"


def _load_optimizer(run: Run, opt_state: dict, trainer: dict[str, Any]) -> None:
    """A one-process (``index``) or gathered (``fqn``) optimizer state, into this run's optimizer."""
    from .dcp_checkpoint import load_full_into_shards, unsupported_reason

    if trainer.get("optimizer_format", "index") == "fqn":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(run.model, run.optimizer, opt_state, options=StateDictOptions(full_state_dict=True))
    elif run.fsdp and unsupported_reason(run.optimizer) is None:
        load_full_into_shards(run, opt_state)  # 1 process -> N FSDP2 processes
    else:
        run.optimizer.load_state_dict(opt_state)


def _load_naming_fallback(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any], dict[str, torch.Tensor]]:
    """``load_checkpoint``, whose error names the previous intact checkpoint the user can fall back to."""
    return _naming_fallback(path, load_checkpoint)


def _naming_fallback(path: Path, read: Any) -> Any:
    try:
        return read(path)
    except CheckpointError as exc:
        prev = previous_checkpoint(path)
        hint = f"; the previous checkpoint {prev} is intact: delete {path.name} to resume from it" if prev else ""
        raise CheckpointError(f"{exc}{hint}") from exc


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed tensors into the model, checking names and shapes first (nothing changes on error)."""
    current = dict(model.named_parameters())
    current.update(dict(model.named_buffers()))
    for key, value in state.items():
        if key not in current:
            raise CheckpointError(f"checkpoint tensor {key!r} does not exist in the model")
        if tuple(current[key].shape) != tuple(value.shape):
            raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, "
                                  f"model expects {tuple(current[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            target = current[key]
            if hasattr(target, "device_mesh") and not hasattr(value, "device_mesh"):  # full tensor -> FSDP2 shard
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
            target.copy_(value)
