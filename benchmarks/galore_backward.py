"""GaLore with the projection inside backward (--galore-in-backward) against today's GaLore and torch AdamW: a full
training step (forward + backward + optimizer step) of a stack of wide Linears, and the weight-gradient bytes.

    .venv/bin/python benchmarks/galore_backward.py [--quick] [--json PATH] [--width 4096] [--layers 2]
        [--tokens 512] [--rank 128] [--gap 200] [--steps 8] [--matrix 11008x4096 --matrix-rank 1024]

Every method trains its own copy of the same stack (Linear(width, width) x layers, MSE on fixed random batches of
``tokens`` rows) and the methods step round-robin (step i of each before step i+1 of any), so load from other jobs
hits them alike. GaLore's first step is a projector refresh (full gradient + randomized range finder); the table
reports it, the steady (between-refresh) step, and their mean over one refresh period of ``--gap`` steps, which is
what a run pays on average. Gradient bytes: weight gradients alive after backward, before the step (full ``.grad``
tensors plus low-rank gradients waiting for the step). Goals (issue #21, item 2): mean step <= 1.1x torch AdamW's;
gradient bytes of the projected layers <= 1.1 r/m of full between refreshes.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leantrain import galore_backward
from leantrain.optim.galore import GaLoreAdamW, GaLoreAdamW8bit
from leantrain.optim.projector import SUPPLIED_GRAD

print = functools.partial(print, flush=True)


def make_stack(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def methods(args: argparse.Namespace) -> dict[str, tuple]:
    """name -> (model, optimizer): the peers and the two GaLore paths, each over its own copy of one stack."""
    galore = {"lr": 1e-3, "rank": args.rank, "update_proj_gap": args.gap}
    out = {}
    for name, build, inside in [
        ("torch AdamW (foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), False),
        ("torch AdamW (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), False),
        ("GaLore fp32 (today)", lambda ps: GaLoreAdamW(ps, **galore), False),
        ("GaLore fp32 in backward", lambda ps: GaLoreAdamW(ps, **galore), True),
        ("GaLore 8-bit (today)", lambda ps: GaLoreAdamW8bit(ps, **galore), False),
        ("GaLore 8-bit in backward", lambda ps: GaLoreAdamW8bit(ps, **galore), True),
    ]:
        model = make_stack(args.width, args.layers)
        opt = build(list(model.parameters()))
        if inside:
            galore_backward.install(model, opt)
        out[name] = (model, opt)
    return out


def grad_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weight-gradient bytes alive now: full ``.grad`` tensors plus supplied low-rank gradients."""
    full = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return full + sum(st[SUPPLIED_GRAD].numel() * st[SUPPLIED_GRAD].element_size()
                      for st in opt.state.values() if SUPPLIED_GRAD in st)


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    t1 = time.perf_counter()
    gbytes = grad_bytes(model, opt)
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return {"fwd_bwd": t1 - t0, "opt": t3 - t2, "total": (t1 - t0) + (t3 - t2), "grad_bytes": gbytes}


def measure(args: argparse.Namespace) -> dict[str, list[dict]]:
    runs = methods(args)
    records: dict[str, list[dict]] = {name: [] for name in runs}
    for i in range(args.steps):
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(args.tokens, args.width, generator=gen), torch.randn(args.tokens, args.width, generator=gen)
        for name, (model, opt) in runs.items():
            records[name].append(one_step(model, opt, x, y))
        print(f"step {i + 1}/{args.steps}: " + ", ".join(f"{n.split(' (')[0][:14]} {r[-1]['total']:.2f}s"
                                                        for n, r in records.items()))
    return records


def summarise(records: dict[str, list[dict]], args: argparse.Namespace) -> list[dict]:
    """Per method: first (refresh / state-init) step, steady median, mean over one refresh period, ratios."""
    rows = []
    for name, recs in records.items():
        steady = recs[1:]
        row = {"method": name, "first_s": recs[0]["total"],
               "steady_s": statistics.median(r["total"] for r in steady),
               "steady_fwd_bwd_s": statistics.median(r["fwd_bwd"] for r in steady),
               "steady_opt_s": statistics.median(r["opt"] for r in steady),
               "grad_bytes_steady": steady[-1]["grad_bytes"], "grad_bytes_first": recs[0]["grad_bytes"]}
        refresh = recs[0]["total"] if "GaLore" in name else row["steady_s"]
        row["mean_period_s"] = (refresh + (args.gap - 1) * row["steady_s"]) / args.gap
        rows.append(row)
    base = next(r for r in rows if r["method"] == "torch AdamW (foreach)")
    fused = next(r for r in rows if r["method"] == "torch AdamW (fused)")
    for r in rows:
        r["vs_adamw_foreach"] = r["mean_period_s"] / base["mean_period_s"]
        r["vs_adamw_fused"] = r["mean_period_s"] / fused["mean_period_s"]
        r["grad_vs_full"] = r["grad_bytes_steady"] / base["grad_bytes_steady"]
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = ("| method | first step s | steady step s (fwd+bwd / opt) | mean over gap s | vs AdamW foreach | "
            "vs AdamW fused | weight-grad MiB steady (vs full) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['first_s']:.3f} | {r['steady_s']:.3f} ({r['steady_fwd_bwd_s']:.3f} / "
                     f"{r['steady_opt_s']:.3f}) | {r['mean_period_s']:.3f} | {r['vs_adamw_foreach']:.2f} | "
                     f"{r['vs_adamw_fused']:.2f} | {r['grad_bytes_steady'] / 2**20:.1f} ({r['grad_vs_full']:.4f}) |")
    lines.append(f"\nr/m = {args.rank}/{args.width} = {args.rank / args.width:.4f}; goal: mean step <= 1.1x AdamW, "
                 f"weight-grad bytes <= {1.1 * args.rank / args.width:.4f} of full between refreshes")
    return "\n".join(lines)


def matrix_step(shape: tuple[int, int], rank: int, reps: int = 3) -> dict[str, float]:
    """The optimizer step alone on one bf16 matrix (LLaMA-7B's 11008 x 4096 MLP weight at r=1024: what --layerwise
    pays per matrix after backward): 8-bit GaLore under the stochastic-rounding bf16 wrapper, as ``--dtype bf16
    --optim galore-adamw8bit`` builds it, stepped with the full bf16 gradient (today) or with the low-rank one a
    projecting backward supplies. Median seconds of ``reps`` steady (between-refresh) steps each."""
    from leantrain.optim.adam import AdamW8bit
    from leantrain.precision import CompensatedOptimizer

    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in ("today", "in backward"):
        w = nn.Parameter((torch.randn(shape, generator=gen) * 0.02).bfloat16())
        opt = CompensatedOptimizer(AdamW8bit([{"params": [w], "rank": rank, "update_proj_gap": 200}], lr=1e-3),
                                   "stochastic", 0)
        full = (torch.randn(shape, generator=gen) * 1e-3).bfloat16()
        w.grad = full
        opt.step()  # the first step: state and the projector refresh (not timed)
        state = opt.state[w]
        low = (state["proj_basis"].bfloat16().mT @ full if state["proj_side"] == 0
               else full @ state["proj_basis"].bfloat16().mT)
        times = []
        for _ in range(reps):
            opt.zero_grad()
            if name == "today":
                w.grad = full.clone()
            else:
                state[SUPPLIED_GRAD] = low.clone()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
        print(f"{shape[0]}x{shape[1]} bf16, r={rank}, {name}: optimizer step {out[name]:.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="width 512, rank 16, 3 steps: a smoke run")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--gap", type=int, default=200)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = fair timing on a shared machine)")
    p.add_argument("--matrix", default=None, help="also time the optimizer step alone on one bf16 matrix "
                                                   "ROWSxCOLS (e.g. 11008x4096, LLaMA-7B's MLP)")
    p.add_argument("--matrix-rank", type=int, default=1024)
    p.add_argument("--json", default=None, help="write the rows as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.rank, args.steps, args.tokens = 512, 16, 3, 128
    torch.set_num_threads(args.threads)
    print(f"stack of {args.layers} x Linear({args.width}, {args.width}), {args.tokens} tokens, rank {args.rank}, "
          f"gap {args.gap}, {args.steps} steps, {args.threads} thread(s); load {os.getloadavg()}")
    rows = summarise(measure(args), args) if args.steps else []
    if rows:
        print(table(rows, args))
    if args.matrix:
        m, n = (int(v) for v in args.matrix.lower().split("x"))
        rows.append({"matrix": [m, n], "rank": args.matrix_rank, **matrix_step((m, n), args.matrix_rank)})
    print(f"load after: {os.getloadavg()}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "rows": rows}))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
