"""GaLore under FSDP2: per-rank memory and communication of the optimizer step (2 gloo processes on CPU).

A stack of ``--layers`` pairs of bias-free Linear layers (d x f and f x d; default LLaMA-1B's 2048 x 5461, so
every gradient matrix is 44.7 MB in fp32 -- above glibc's 32 MB mmap threshold, so its allocation shows in RSS),
each layer and the stack ``fully_shard``-ed on a 1-D mesh, trained by ``GaLoreAdamW`` (fp32 moments). Per step and
rank it records:

* ``step_peak_mb``: peak RSS during ``optimizer.step()`` above the RSS just before it (VmHWM reset through
  ``/proc/self/clear_refs`` before the step) -- the transient memory of the step;
* ``comm_mb``: bytes of the results of the collectives the step issues (``DTensor.full_tensor``,
  ``dist.all_reduce``, ``dist.all_gather``), i.e. what each rank receives or holds as a collective's output;
* ``seconds`` of the step; and ``ru_maxrss_mb`` of the whole process at the end, and whether the (replicated)
  bases and low-rank moments are bitwise the same on every rank (``replicated_state_identical``).

``--src DIR`` imports leantrain from DIR instead of this checkout (e.g. an export of the previous commit, for a
before/after comparison)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/galore_fsdp.py --json after.json
    git archive e728b1d | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/galore_fsdp.py --src /tmp/before --json before.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _count_collectives(counter: dict) -> None:
    """Wrap the collectives the optimizer may issue so that ``counter["bytes"]`` grows by each result's size."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    full_tensor, all_reduce, all_gather = DTensor.full_tensor, dist.all_reduce, dist.all_gather

    def counted_full_tensor(self, *a, **k):
        out = full_tensor(self, *a, **k)
        counter["bytes"] += out.numel() * out.element_size()
        return out

    def counted_all_reduce(t, *a, **k):
        counter["bytes"] += t.numel() * t.element_size()
        return all_reduce(t, *a, **k)

    def counted_all_gather(parts, t, *a, **k):
        counter["bytes"] += sum(x.numel() * x.element_size() for x in parts)
        return all_gather(parts, t, *a, **k)

    DTensor.full_tensor, dist.all_reduce, dist.all_gather = counted_full_tensor, counted_all_reduce, counted_all_gather


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.src)
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from leantrain.optim.galore import GaLoreAdamW

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(*dims, bias=False) for _ in range(args.layers)
                            for dims in ((args.hidden, args.inner), (args.inner, args.hidden))])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = GaLoreAdamW(model.parameters(), lr=1e-3, rank=args.rank, update_proj_gap=args.gap, svd=args.svd)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch, args.hidden, generator=gen)
    counter = {"bytes": 0}
    _count_collectives(counter)
    steps = []
    for step in range(1, args.steps + 1):
        model(x).square().mean().backward()
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        counter["bytes"], t0 = 0, time.perf_counter()
        opt.step()
        seconds = time.perf_counter() - t0
        steps.append({"step": step, "refresh": (step - 1) % args.gap == 0, "seconds": round(seconds, 3),
                      "step_peak_mb": round((_status_kb("VmHWM") - before) / 1024, 1),
                      "comm_mb": round(counter["bytes"] / 2**20, 2)})
        opt.zero_grad(set_to_none=True)
    replicated = [st[k] for st in opt.state.values() for k in ("proj_basis", "exp_avg", "exp_avg_sq")]
    theirs = [None] * world
    dist.all_gather_object(theirs, replicated)  # the basis and low-rank moments: bitwise the same on every rank?
    mine = {"rank": rank, "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "replicated_state_identical": all(torch.equal(a, b) for other in theirs for a, b in zip(replicated, other)),
            "steps": steps}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out = {"src": args.src, "layers": args.layers, "d": args.hidden, "f": args.inner, "rank": args.rank,
               "gap": args.gap, "svd": args.svd, "world": world, "ranks": everyone}
        text = json.dumps(out, indent=1)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", default=str(ROOT), help="folder to import leantrain from (default: this checkout)")
    p.add_argument("--layers", type=int, default=2, help="pairs of Linear layers (d x f, f x d)")
    p.add_argument("--hidden", type=int, default=2048, help="d")
    p.add_argument("--inner", type=int, default=5461, help="f")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--gap", type=int, default=2)
    p.add_argument("--svd", default="randomized", choices=("randomized", "full"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes),
           __file__, "--worker", *sys.argv[1:]]  # (no option of ours may prefix one of torchrun's)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


if __name__ == "__main__":
    main()
