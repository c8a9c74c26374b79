"""Block-wise optimizer state of FSDP2-sharded parameters follows global blocks: 1, 2 and 4 processes store the
same codes and absmax scales and make the same updates as one process (exact equality, not a tolerance).

Parameters and gradients are DTensors sharded on dim 0 (``distribute_tensor``, the layout ``fully_shard``
gives), so the gradients are identical to one process's bit for bit and any difference comes from the optimizer.
Shapes are chosen so shard boundaries fall inside blocks, at odd offsets (4-bit nibble pairs), inside a single
block, and past the last row (an empty shard).
"""
from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from leantrain.optim import AdamW4bit, AdamW8bit
from leantrain.optim.shards import ShardGeometry

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")

SHAPES = [(300, 37), (5, 1000), (64, 3), (1001,), (3, 7, 41)]
STEPS = 3


def _tensors(seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * (10.0 ** -k) for k, s in enumerate(SHAPES)] for _ in range(STEPS)]
    return params, grads


def _run(cls, params, grads, to_param=lambda t: torch.nn.Parameter(t.clone()), to_grad=lambda t: t):
    ps = [to_param(p) for p in params]
    opt = cls(ps, lr=1e-2, min_8bit_size=0, block_size=64)
    for step_grads in grads:
        for p, gr in zip(ps, step_grads):
            p.grad = to_grad(gr.clone())
        opt.step()
    return ps, opt


def _worker(rank: int, world: int, init: str, cls_name: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        cls = {"AdamW8bit": AdamW8bit, "AdamW4bit": AdamW4bit}[cls_name]
        params, grads = _tensors(0)
        ps, opt = _run(cls, params, grads,
                       to_param=lambda t: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])),
                       to_grad=lambda t: distribute_tensor(t, mesh, [Shard(0)]))
        result = {f"param.{i}": p.full_tensor().contiguous() for i, p in enumerate(ps)}
        result.update({f"state.{i}.{k}": v.contiguous() for i, p in enumerate(ps) for k, v in opt.state[p].items()})
        save_file(result, os.path.join(out, f"rank{rank}.safetensors"))
        dist.barrier()  # as leantrain.dist.shutdown: no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def _global_state(per_rank: list[dict], shape: tuple[int, ...], world: int, bits: int, block: int) -> dict:
    """Stitch the ranks' local codes / absmax back into one process's layout (blocks shared by two ranks must
    carry the same scale on both)."""
    from leantrain.optim import quant
    from leantrain.optim.shards import rows_split

    total = torch.Size(shape).numel()
    per_row = total // shape[0]
    out = {}
    for moment in ("exp_avg", "exp_avg_sq"):
        codes, absmax = [], {}
        for (a, b), st in zip(rows_split(shape[0], world), per_rank):
            o, n = a * per_row, (b - a) * per_row
            c = st[moment + "_codes"]
            c = quant.unpack_4bit(c, o % 2 + n)[o % 2:] if bits == 4 else c
            codes.append(c[:n])
            for i, value in enumerate(st[moment + "_absmax"].tolist()):
                block_id = o // block + i
                assert absmax.setdefault(block_id, value) == value, f"{moment} block {block_id}: ranks disagree"
        full = torch.cat(codes)
        out[moment + "_codes"] = quant.pack_4bit(full) if bits == 4 else full
        out[moment + "_absmax"] = torch.tensor([absmax[k] for k in sorted(absmax)])
    return out


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit])
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_state_equals_one_process(tmp_path, cls, world):
    params, grads = _tensors(0)
    ref_params, ref_opt = _run(cls, params, grads)
    init = f"file://{tempfile.mktemp(dir=tmp_path)}"
    mp.start_processes(_worker, args=(world, init, cls.__name__, str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    bits = 8 if cls is AdamW8bit else 4
    for i, shape in enumerate(SHAPES):
        assert torch.equal(ranks[0][f"param.{i}"], ref_params[i].detach()), f"parameter {shape} differs"
        local = [{k.split(".", 2)[2]: v for k, v in r.items() if k.startswith(f"state.{i}.")} for r in ranks]
        stitched = _global_state(local, shape, world, bits, 64)
        for key, value in stitched.items():
            assert torch.equal(value, ref_opt.state[ref_params[i]][key]), f"{key} of {shape} differs"


@pytest.mark.parametrize("offset,numel,total,expect", [
    (0, 256, 1000, (0, 256)),        # whole blocks only
    (100, 300, 1000, (156, 156)),    # shares its first and last block (no whole block)
    (100, 700, 1000, (156, 668)),    # shares both ends, whole block in between
    (100, 50, 1000, (50, 50)),       # inside one shared block
    (768, 232, 1000, (0, 232)),      # the tensor's (short) last block, all here
    (700, 300, 1000, (68, 300)),     # first block shared, ends with the tensor
    (0, 0, 1000, (0, 0)),            # empty shard
])
def test_shared_block_pieces(offset, numel, total, expect):
    assert ShardGeometry(offset, numel, total, (), None).pieces(256) == expect
