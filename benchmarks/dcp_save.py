"""Per-rank memory of saving an FSDP2 checkpoint: sharded DCP (each rank writes its shards) vs the full-state
gather that FSDP2 checkpoints used before (``get_optimizer_state_dict(full_state_dict=True)`` + full tensors).

A stack of ``--layers`` bias-free ``--dim`` x ``--dim`` Linear layers, each and the stack ``fully_shard``-ed on a
1-D gloo mesh, one optimizer step, then one save through ``leantrain.dcp_checkpoint.save`` (the code
``leantrain train --save-every`` runs). Per rank it records the peak RSS during the save above the RSS just before
it (VmHWM reset through ``/proc/self/clear_refs``) and the bytes the rank holds in parameters + optimizer state
(its shard), and prints their ratio. The issue's goal: peak while saving <= 1.1x the shard.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dcp_save.py --nproc 2 --json docs/img/dcp_save.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from galore_fsdp import _status_kb


def _measure(fn) -> tuple[float, float]:
    """(peak RSS above the start in MB, seconds) of ``fn()``."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    return (_status_kb("VmHWM") - before) / 1024, time.perf_counter() - t0


def worker(optim: str, mode: str, layers: int, dim: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from leantrain import dcp_checkpoint
    from leantrain.dist_utils import local_bytes, optimizer_state_bytes_local
    from leantrain.optim import AdamW4bit, AdamW8bit

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    cls = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit, "adamw4bit": AdamW4bit}[optim]
    opt = cls(model.parameters(), lr=1e-3)
    model(torch.randn(4, dim)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    shard = local_bytes(model.parameters()) + optimizer_state_bytes_local(opt)
    run = SimpleNamespace(model=model, optimizer=opt, method=None, ctx=SimpleNamespace(is_main=rank == 0))
    folder = Path(out) / "ckpt"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if mode == "dcp":
        peak, secs = _measure(lambda: dcp_checkpoint.save(run, folder))
    else:  # before: every tensor gathered to full size (rank 0 would then write one file)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        def gather() -> None:
            full = {n: p.full_tensor() for n, p in model.named_parameters()}
            state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
            del full, state
        peak, secs = _measure(gather)
    row = {"rank": rank, "world": world, "optim": optim, "mode": mode, "shard_mb": shard / 2**20,
           "save_peak_mb": peak, "ratio": peak * 2**20 / shard, "seconds": secs}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("DCP-SAVE " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def launch(optim: str, mode: str, nproc: int, layers: int, dim: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lt-dcp-save-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(Path(__file__).resolve()), "--worker", optim, mode, str(layers), str(dim), tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DCP-SAVE ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{optim}/{mode} on {nproc} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--optims", default="adamw,adamw8bit,adamw4bit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        optim, mode, layers, dim, out = args.worker
        worker(optim, mode, int(layers), int(dim), out)
        return 0
    rows = []
    print("| optimizer | save | processes | shard per rank (MB) | peak while saving (MB) | peak / shard |")
    print("|---|---|---|---|---|---|")
    for optim in args.optims.split(","):
        for mode in ("gather", "dcp"):
            ranks = launch(optim, mode, args.nproc, args.layers, args.dim)
            rows += ranks
            worst = max(ranks, key=lambda r: r["ratio"])
            print(f"| {optim} | {mode} | {args.nproc} | {worst['shard_mb']:.1f} | {worst['save_peak_mb']:.1f} | "
                  f"{worst['ratio']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
