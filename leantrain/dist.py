"""torch.distributed glue: DDP and FSDP2 under ``torchrun``, with nothing home-made on the wire.

``leantrain train`` runs unchanged under ``torchrun --nproc-per-node N``: ``init_from_env`` reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group (gloo on CPU, nccl on CUDA). The global
batch (``--batch-size``) is split evenly across processes, so N processes × B/N rows follow the same trajectory
as 1 process × B rows (gradients are averaged by DDP / reduce-scattered by FSDP2), and a checkpoint resumes on
any number of processes. Only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def check_device(device_name: str) -> None:
    """Refuse a device this torch build or machine does not have, in one line (torch raises an AssertionError
    deep inside the first ``.to()`` instead)."""
    kind, _, index = device_name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
        raise ValueError(f"--device {device_name}: this machine has {build}; use --device cpu or auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device_name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device_name}: MPS is not available here; use --device cpu or auto")


def init_from_env(device_name: str, strategy: str) -> DistContext:
    """Start the process group when launched by torchrun; a single process gets a context with world=1."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    check_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if world <= 1:
        device = torch.device("cuda" if use_cuda else "cpu") if device_name == "auto" else torch.device(device_name)
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local_rank, device, "ddp" if strategy == "auto" else strategy)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result -- or its error, re-raised everywhere -- to every rank."""
    if not ctx.enabled:
        return fn()
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001  (re-raised on every rank below, so no rank waits forever)
            payload[0] = ("error", exc)
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def shard_batch(batch: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of a global batch (every tensor is split along dim 0)."""
    if not ctx.enabled:
        return batch
    rows = next(iter(batch.values())).shape[0]
    if rows % ctx.world:
        raise ValueError(f"global batch of {rows} rows does not split evenly over {ctx.world} processes; "
                         f"choose --batch-size divisible by {ctx.world}")
    per = rows // ctx.world
    return {k: v[ctx.rank * per:(ctx.rank + 1) * per] for k, v in batch.items()}


def mean_across(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world


def wrap_model(model: nn.Module, ctx: DistContext, bucket_view: bool = False) -> nn.Module:
    """DDP wrapper, or FSDP2 ``fully_shard`` on every transformer block and the root (in place).

    ``bucket_view``: DDP's ``gradient_as_bucket_view`` (``p.grad`` are views of the bucket buffers, no second copy
    of the gradients; used by --layerwise, whose communication hook steps from the buckets)."""
    if not ctx.enabled:
        return model
    if ctx.strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # no buffer broadcast on every forward (buffers are identical on every rank); torch >= 2.13 names the
        # option forward_sync_buffers and warns about the old broadcast_buffers
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        return DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                       gradient_as_bucket_view=bucket_view, **{sync: False})
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if module is not model and _is_block(module):
            fully_shard(module)
    fully_shard(model)
    return model


def _is_block(module: nn.Module) -> bool:
    """Transformer blocks are the FSDP2 units (HF names: BertLayer, LlamaDecoderLayer, ...)."""
    name = type(module).__name__
    return name.endswith("Layer") and name not in ("Linear", "LayerNorm") and any(True for _ in module.children())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def unwrap(model: nn.Module) -> nn.Module:
    wrapped = getattr(model, "module", None)  # DDP keeps the model in .module
    return wrapped if isinstance(wrapped, nn.Module) else model
