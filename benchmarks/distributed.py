"""Method x optimizer x strategy matrix under torchrun (2 and 4 gloo processes vs 1 process), MiniLM scaling, and
per-rank optimizer-state bytes under FSDP2 at 1, 2 and 4 processes.

Every configuration runs in its own process(es): a 1-process reference (``python -m leantrain train``) and one
``torchrun`` job per strategy and process count (``--nprocs``, default 2,4) with the same global batch and
dropout 0, then the per-step losses (``metrics.jsonl``) and the final trainable tensors
(``trainable.safetensors``) are compared against the row's stated tolerance (``tolerances``). A failing run
records the innermost exception line of its traceback as the reason.

    .venv/bin/python benchmarks/distributed.py --matrix --jobs 1 --json docs/img/distributed_matrix_124.json
    .venv/bin/python benchmarks/distributed.py --only full:adamw8bit:fsdp,lora:adamw:ddp --nprocs 2,4 --jobs 1
    .venv/bin/python benchmarks/distributed.py --scaling --json docs/img/distributed_scaling.json
    .venv/bin/python benchmarks/distributed.py --state-bytes --nprocs 2,4 --json docs/img/distributed_state_124.json
    .venv/bin/python benchmarks/distributed.py --table-from A.json,B.json   # the tables of saved runs
    .venv/bin/python benchmarks/distributed.py --quick          # two configurations, for a smoke test

``--worker-state-bytes`` is the per-rank part of ``--state-bytes`` (launched by torchrun, not by hand); it
assembles the run with ``leantrain.run.build_run`` and steps it with the trainer's ``leantrain.loop.Closure``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # import leantrain from this checkout
BASE = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--lr", "1e-3", "--steps", "4", "--dropout", "0", "--model-dropout", "0"]
METHODS = ["full", "head", "lora", "rslora", "dora", "pissa", "vera", "miss", "shira", "gradnormlorp", "dlrt"]
# key optimizers: on full fine-tuning (where GaLore projects) and on LoRA (small adapter tensors)
OPTIM_CONFIGS = [("full", o) for o in ("adamw8bit", "adamw4bit", "galore-adamw", "galore-adamw8bit", "lion8bit")]
OPTIM_CONFIGS += [("lora", o) for o in ("adamw8bit", "adamw4bit", "lion8bit")]
STRATEGIES = ("ddp", "fsdp")
TIMEOUT = 900
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4  # same per-step losses; final weights within Adam's rounding amplification


def _env() -> dict[str, str]:
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": path}


def launch(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """One ``leantrain train`` job: plain python for 1 process, torchrun for more."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "leantrain", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "leantrain", "train", *args]
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), cwd=ROOT,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -9, exc.stdout or "", f"TimeoutExpired: no exit after {TIMEOUT} s")


_ERR = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_.]*(?:Error|Exception|Expired)[A-Za-z_]*: .*)$")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def failure_reason(stderr: str) -> str:
    """The first rank's innermost exception line plus the deepest leantrain frame that raised it."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        frame, j = "", i + 1
        while j < len(lines):
            m = _FRAME.search(lines[j])
            if m and "/leantrain/" in m.group(1) or (m and "/benchmarks/" in m.group(1)):
                frame = f"{m.group(1).split('/work/main/')[-1]}:{m.group(2)} ({m.group(3)})"
            e = _ERR.match(lines[j].strip())
            if e and not lines[j].strip().startswith("File"):
                return f"{e.group(1)[:300]} [at {frame}]" if frame else e.group(1)[:300]
            j += 1
    cli = next((x.split("leantrain: error: ", 1)[1] for x in lines if "leantrain: error: " in x), None)
    if cli:  # the CLI's one-line error for bad input (no traceback)
        return f"leantrain: error: {cli}"[:300]
    tail = [x for x in lines if x.strip()][-3:]
    return " | ".join(tail)[-300:] or "unknown"


def compare(a: Path, b: Path) -> tuple[float, float]:
    """Max |loss difference| over logged steps and max |tensor difference| over the final trainable state."""
    from safetensors.torch import load_file

    from leantrain.report import read_jsonl

    la = [(r["step"], r["loss"]) for r in read_jsonl(a / "metrics.jsonl") if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_jsonl(b / "metrics.jsonl") if "loss" in r]
    if [s for s, _ in la] != [s for s, _ in lb]:
        raise ValueError(f"logged steps differ: {[s for s, _ in la]} vs {[s for s, _ in lb]}")
    loss = max(abs(x - y) for (_, x), (_, y) in zip(la, lb))
    wa, wb = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    if wa.keys() != wb.keys():
        raise ValueError(f"trainable tensors differ: {sorted(set(wa) ^ set(wb))[:4]}")
    shapes = [k for k in wa if wa[k].shape != wb[k].shape]
    if shapes:
        raise ValueError(f"tensor {shapes[0]} has shape {tuple(wa[shapes[0]].shape)} vs {tuple(wb[shapes[0]].shape)}")
    weight = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel()), default=0.0)
    return loss, weight


LR = 1e-3  # BASE's --lr
SIGN_FLIP_TOL = 2 * LR + WEIGHT_TOL  # Lion: one component's sign flips once (lr * sign(.) -> 2 lr), plus Adam's 1e-4


def tolerances(method: str, optim: str) -> tuple[float, float]:
    """(loss, final weight) tolerance of one configuration, absolute; stated in every row.

    Default: losses 1e-5, weights 1e-4 (Adam turns rounding of near-zero gradients into up to ~1 % of lr, see
    docs/distributed.md "LoRA/DoRA under DDP"). Lion's update is ``lr * sign(.)``: a component whose interpolated
    momentum is ~0 flips sign under a rounding-level change of the averaged gradient, which moves that weight by
    2 lr, so Lion rows allow one such flip (2e-3 + 1e-4) in the weights; their losses keep 1e-5."""
    if optim.startswith("lion"):
        return LOSS_TOL, SIGN_FLIP_TOL
    return LOSS_TOL, WEIGHT_TOL


def run_pair(method: str, optim: str, strategies: tuple[str, ...], work: Path,
             nprocs: tuple[int, ...] = (2,)) -> list[dict]:
    """1-process reference, then one N-process run per strategy and N in ``nprocs``; one row per (strategy, N)."""
    args = [*BASE, "--method", method, "--optim", optim]
    ref = work / f"{method}-{optim}-1"
    t0 = time.time()
    proc = launch([*args, "--out", str(ref)], 1)
    ref_time = time.time() - t0
    loss_tol, weight_tol = tolerances(method, optim)
    rows = []
    for strategy in strategies:
        for nproc in nprocs:
            row = {"method": method, "optim": optim, "strategy": strategy, "nproc": nproc, "works": False,
                   "max_loss_diff": None, "max_weight_diff": None, "loss_tol": loss_tol, "weight_tol": weight_tol,
                   "reason": ""}
            if proc.returncode != 0:
                row["reason"] = "1-process reference failed: " + failure_reason(proc.stderr)
                row["stderr_tail"] = proc.stderr[-6000:]
                rows.append(row)
                continue
            out = work / f"{method}-{optim}-{strategy}-{nproc}"
            t0 = time.time()
            many = launch([*args, "--strategy", strategy, "--out", str(out)], nproc)
            row["seconds"] = round(time.time() - t0, 1)
            row["ref_seconds"] = round(ref_time, 1)
            if many.returncode != 0:
                row["reason"] = failure_reason(many.stderr)
                row["stderr_tail"] = many.stderr[-6000:]
            else:
                try:
                    row["max_loss_diff"], row["max_weight_diff"] = compare(ref, out)
                    row["works"] = judge(row)
                    if not row["works"]:
                        row["reason"] = f"runs, but {nproc} processes diverge from 1 process"
                except Exception as exc:  # noqa: BLE001 -- a broken output is a result row, not a crash
                    row["reason"] = f"runs, outputs not comparable: {exc}"
            rows.append(row)
    return rows


def judge(row: dict) -> bool:
    """Works = ran, and matched 1 process: losses within the row's loss tolerance, final trainable tensors within
    its weight tolerance (LOSS_TOL / WEIGHT_TOL for rows saved without their own)."""
    return (row["max_loss_diff"] is not None and row["max_loss_diff"] < row.get("loss_tol", LOSS_TOL)
            and row["max_weight_diff"] < row.get("weight_tol", WEIGHT_TOL))


def matrix(configs: list[tuple[str, str]], strategies: tuple[str, ...], jobs: int, nprocs: tuple[int, ...] = (2,),
           save: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every configuration's rows; ``save`` gets the rows so far after each configuration (partial results)."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lt-dist-") as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_pair, m, o, strategies, Path(tmp), nprocs) for m, o in configs]
        for fut in tqdm(futures, desc="matrix", unit="config"):
            for row in fut.result():
                rows.append(row)
                print({k: v for k, v in row.items() if k != "stderr_tail"}, flush=True)
            if save is not None:
                save(rows)
    return rows


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def short(reason: str, limit: int = 150) -> str:
    """The message cut to ``limit`` characters, keeping the ``[at file:line]`` suffix."""
    message, at, frame = reason.replace("|", "/").partition(" [at ")
    if len(message) > limit:
        message = message[:limit - 3].rstrip() + "..."
    return f"{message}{at}{frame}"


def print_matrix(rows: list[dict]) -> None:
    """One line per row; rows saved before --nprocs existed are 2-process rows with the default tolerances."""
    print("| method | optimizer | strategy | processes | works | max loss diff | max weight diff | "
          "tolerance (loss / weights) | reason when not |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tol = f"{fmt(r.get('loss_tol', LOSS_TOL))} / {fmt(r.get('weight_tol', WEIGHT_TOL))}"
        print(f"| {r['method']} | {r['optim']} | {r['strategy']} | {r.get('nproc', 2)} | "
              f"{'yes' if r['works'] else 'no'} | {fmt(r['max_loss_diff'])} | {fmt(r['max_weight_diff'])} | "
              f"{tol} | {short(r['reason'])} |")


def scaling(steps: int) -> list[dict]:
    """sec/step of the training loop (rank 0's ``metrics.json``) for 1 and 2 processes on the embedded MiniLM."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lt-scale-") as tmp:
        for method in ("lora", "full"):
            for nproc in (1, 2):
                out = Path(tmp) / f"{method}-{nproc}"
                args = ["--model", "minilm", "--train-size", "256", "--val-size", "32", "--max-length", "64",
                        "--batch-size", "16", "--steps", str(steps), "--no-progress", "--method", method,
                        "--out", str(out)]
                if nproc > 1:
                    args += ["--strategy", "ddp"]
                proc = launch(args, nproc)
                row = {"method": method, "nproc": nproc, "batch": 16, "max_length": 64, "steps": steps}
                if proc.returncode != 0:
                    row["error"] = failure_reason(proc.stderr)
                else:
                    row["sec_per_step"] = json.loads((out / "metrics.json").read_text())["sec_per_step"]
                rows.append(row)
                print(row, flush=True)
    return rows


def _state_split(opt) -> dict[str, int]:
    """This rank's optimizer-state bytes split by what FSDP2 does with them: state of a parameter with a GaLore
    projector (``proj_basis`` in its state: low-rank moments, bases -- the same on every rank) vs everything else
    (state shaped like the local shard: dense moments, 8/4-bit codes and scales, step counters)."""
    from leantrain.dist_utils import local_bytes

    split = {"replicated_lowrank_moments": 0, "replicated_lowrank_bases": 0, "sharded_dense": 0}
    for state in opt.state.values():
        if not isinstance(state, dict):
            continue
        if "proj_basis" in state:
            for key, value in state.items():
                part = "replicated_lowrank_bases" if key.startswith("proj_") else "replicated_lowrank_moments"
                split[part] += local_bytes([value])
        else:
            split["sharded_dense"] += local_bytes(state.values())
    return split


def state_bytes_worker(method: str, optim: str, model: str) -> None:
    """Under torchrun: assemble the run exactly as ``leantrain train --strategy fsdp`` does
    (``leantrain.run.build_run``), take one optimizer step with the trainer's closure (``leantrain.loop.Closure``),
    report the bytes of this rank's optimizer state (``.to_local()`` of DTensor states) and of its parameters."""
    import torch

    from leantrain import dist
    from leantrain.config import TrainConfig
    from leantrain.dist_utils import local_bytes, optimizer_state_bytes_local
    from leantrain.loop import Closure
    from leantrain.run import build_run

    cfg = TrainConfig(model=model, method=method, optim=optim, train_size=64, val_size=16, max_length=32,
                      batch_size=8, dropout=0.0, model_dropout=0.0, progress=False, lr=1e-4, strategy="fsdp")
    ctx = dist.init_from_env("cpu", "fsdp")
    run = build_run(cfg, ctx)
    run.optimizer.step(Closure.for_run(run))
    opt = run.optimizer
    state = optimizer_state_bytes_local(opt)
    global_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                       if isinstance(t, torch.Tensor))
    row = {"rank": ctx.rank, "world": ctx.world, "optimizer_state_bytes_local": state,
           "optimizer_state_bytes_global_view": global_state, "param_bytes_local": local_bytes(run.model.parameters()),
           **_state_split(opt)}
    rows = [None] * ctx.world
    if ctx.enabled:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if ctx.rank == 0:
        print("STATE-BYTES " + json.dumps(rows), flush=True)
    dist.shutdown(ctx)


def state_bytes(configs: list[tuple[str, str]], model: str, nprocs: tuple[int, ...] = (1, 2)) -> list[dict]:
    rows = []
    for method, optim in configs:
        for nproc in nprocs:
            worker = [str(Path(__file__).resolve()), "--worker-state-bytes", method, optim, model]
            cmd = ([sys.executable] if nproc == 1 else
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)])
            proc = subprocess.run([*cmd, *worker], check=False, capture_output=True, text=True, env=_env(), cwd=ROOT,
                                  timeout=TIMEOUT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("STATE-BYTES ")), None)
            row = {"method": method, "optim": optim, "model": model, "nproc": nproc}
            if proc.returncode != 0 or line is None:
                row["error"] = failure_reason(proc.stderr)
                row["stderr_tail"] = proc.stderr[-6000:]
            else:
                row["ranks"] = json.loads(line.split(" ", 1)[1])
            rows.append(row)
            print({k: v for k, v in row.items() if k != "stderr_tail"}, flush=True)
    return rows


def _per_rank(ranks: list[dict], key: str) -> str:
    """``key`` of every rank in MB, ``a / b / ...``; ``-`` where a row saved by older code lacks it."""
    return " / ".join(f"{x[key] / 1e6:.2f}" if key in x else "-" for x in ranks)


def print_state_bytes(rows: list[dict]) -> None:
    """Per-rank optimizer state (largest rank) and its ratio to 1 process; the GaLore split where it applies."""
    ones = {(r["method"], r["optim"]): max(x["optimizer_state_bytes_local"] for x in r["ranks"])
            for r in rows if r["nproc"] == 1 and "ranks" in r}
    print("| method | optimizer | processes | optimizer state per rank (MB) | largest rank / 1 process | "
          "sharded dense state (MB) | replicated low-rank moments (MB) | replicated low-rank bases (MB) | "
          "params per rank (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ranks" not in r:
            print(f"| {r['method']} | {r['optim']} | {r['nproc']} | failed: {short(r.get('error', ''))} | | | | | |")
            continue
        ranks = r["ranks"]
        big = max(x["optimizer_state_bytes_local"] for x in ranks)
        one = ones.get((r["method"], r["optim"]))
        ratio = f"{big / one:.3f}" if one else "-"
        cols = [_per_rank(ranks, key) for key in ("optimizer_state_bytes_local", "sharded_dense",
                                                   "replicated_lowrank_moments", "replicated_lowrank_bases",
                                                   "param_bytes_local")]
        print(f"| {r['method']} | {r['optim']} | {r['nproc']} | {cols[0]} | {ratio} | {' | '.join(cols[1:])} |")


def plot_state_bytes(rows: list[dict], png: str) -> None:
    """Bars: optimizer state per rank, 1 process vs 2 FSDP processes (the largest rank), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs: dict[tuple, dict] = {}
    for r in rows:
        if "ranks" not in r:
            continue
        patched = r.get("with_proposed_adam_patch", False)
        entry = pairs.setdefault((r["method"], r["optim"], patched), {
            "tag": f"{r['method']}\n{r['optim']}" + ("\n(adam.py patch)" if patched else "")})
        entry[r["nproc"]] = max(x["optimizer_state_bytes_local"] for x in r["ranks"]) / 1e6
    bars = [v for v in pairs.values() if 1 in v and 2 in v]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(len(bars)))
    ax.bar([x - 0.2 for x in xs], [v[1] for v in bars], 0.4, label="1 process")
    ax.bar([x + 0.2 for x in xs], [v[2] for v in bars], 0.4, label="2 processes, FSDP2 (per rank)")
    for x, v in zip(xs, bars):
        ax.text(x + 0.2, v[2], f"{v[2] / v[1]:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [v["tag"] for v in bars], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("optimizer state per rank (MB, log)")
    ax.set_title("Per-rank optimizer state, embedded MiniLM-L6 (to_local() of every state tensor)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def parse_configs(text: str, strategies: tuple[str, ...]) -> list[tuple[str, str, tuple[str, ...]]]:
    """``method:optim[:strategy]`` items, comma-separated; without a strategy an item runs every --strategies."""
    configs = []
    for item in (x for x in text.split(",") if x):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--only: {item!r} is not method:optim or method:optim:strategy")
        own = (parts[2],) if len(parts) == 3 else strategies
        bad = [s for s in own if s not in STRATEGIES]
        if bad:
            raise SystemExit(f"--only: unknown strategy {bad[0]!r} in {item!r}; choose from {', '.join(STRATEGIES)}")
        configs.append((parts[0], parts[1], own))
    return configs


def run_configs(configs: list[tuple[str, str, tuple[str, ...]]], jobs: int, nprocs: tuple[int, ...],
                save: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """``matrix`` over configurations that may each carry their own strategies (same-strategy runs merged, kept in
    order); a configuration listed twice with different strategies shares nothing but the method and optimizer."""
    merged: dict[tuple[str, str], list[str]] = {}
    for method, optim, own in configs:
        merged.setdefault((method, optim), [])
        merged[(method, optim)] += [s for s in own if s not in merged[(method, optim)]]
    rows: list[dict] = []
    by_strategies: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for key, own in merged.items():
        by_strategies.setdefault(tuple(own), []).append(key)
    for own, keys in by_strategies.items():
        done = list(rows)
        rows += matrix(keys, own, jobs, nprocs, None if save is None else (lambda new, done=done: save(done + new)))
    return rows


def load_rows(paths: str, key: str) -> list[dict]:
    """The ``key`` rows of one or more saved --json files (comma-separated), in order."""
    rows: list[dict] = []
    for path in (x for x in paths.split(",") if x):
        rows += json.loads(Path(path).read_text()).get(key, [])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", action="store_true", help="the full method/optimizer x strategy matrix")
    ap.add_argument("--only", default=None, help="comma list of method:optim (or method:optim:strategy) instead of "
                                                 "the default matrix")
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument("--nprocs", default="2,4",
                    help="process counts compared with 1 process (matrix), or measured besides 1 (--state-bytes)")
    ap.add_argument("--scaling", action="store_true", help="MiniLM sec/step, 1 vs 2 processes (LoRA, full)")
    ap.add_argument("--scaling-steps", type=int, default=6)
    ap.add_argument("--state-bytes", action="store_true", help="per-rank optimizer-state bytes under FSDP")
    ap.add_argument("--state-model", default="minilm")
    ap.add_argument("--state-configs", default="full:adamw,full:adamw8bit,full:galore-adamw8bit,lora:adamw",
                    help="method:optim pairs for --state-bytes")
    ap.add_argument("--quick", action="store_true", help="lora/adamw and full/adamw8bit under ddp+fsdp")
    ap.add_argument("--jobs", type=int, default=2, help="configurations run at the same time")
    ap.add_argument("--json", default=None, help="write the results here (the matrix after every configuration)")
    ap.add_argument("--table-from", default=None,
                    help="print the tables of saved --json files (comma-separated, rows concatenated) and exit")
    ap.add_argument("--plot-from", nargs=2, metavar=("JSON", "PNG"), default=None,
                    help="plot the state_bytes rows of a saved --json file and exit")
    ap.add_argument("--worker-state-bytes", nargs=3, metavar=("METHOD", "OPTIM", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_state_bytes:
        state_bytes_worker(*args.worker_state_bytes)
        return 0
    if args.plot_from:
        plot_state_bytes(json.loads(Path(args.plot_from[0]).read_text())["state_bytes"], args.plot_from[1])
        return 0
    if args.table_from:
        rows = load_rows(args.table_from, "matrix")
        for r in rows:
            if r["max_loss_diff"] is not None:
                r["works"] = judge(r)
                default = f"runs, but {r.get('nproc', 2)} processes diverge from 1 process"
                r["reason"] = "" if r["works"] else (r["reason"] or default)
        if rows:
            print_matrix(rows)
        states = load_rows(args.table_from, "state_bytes")
        if states:
            print_state_bytes(states)
        return 0
    strategies = tuple(s for s in args.strategies.split(",") if s)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"--strategies: unknown {bad[0]!r}; choose from {', '.join(STRATEGIES)}")
    try:
        nprocs = tuple(int(x) for x in args.nprocs.split(",") if x)
    except ValueError:
        raise SystemExit(f"--nprocs: {args.nprocs!r} is not a comma list of process counts") from None
    if not nprocs or any(n < 1 for n in nprocs):
        raise SystemExit(f"--nprocs: {args.nprocs!r}: give process counts >= 1")
    results: dict = {}

    def save(partial: dict | None = None) -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**results, **(partial or {})}, indent=2) + "\n")

    if args.quick or args.matrix or args.only:
        if args.only:
            configs = parse_configs(args.only, strategies)
        elif args.quick:
            configs = [("lora", "adamw", strategies), ("full", "adamw8bit", strategies)]
        else:
            configs = [(m, o, strategies) for m, o in [(m, "adamw") for m in METHODS] + OPTIM_CONFIGS]
        many = tuple(n for n in nprocs if n > 1)
        results["matrix"] = run_configs(configs, args.jobs, many, lambda rows: save({"matrix": rows}))
        print_matrix(results["matrix"])
    if args.scaling:
        results["scaling"] = scaling(args.scaling_steps)
    if args.state_bytes:
        pairs = [tuple(x.split(":")) for x in args.state_configs.split(",") if x]
        results["state_bytes"] = state_bytes(pairs, args.state_model, tuple(sorted({1, *nprocs})))
        print_state_bytes(results["state_bytes"])
    if not results:
        ap.error("choose --matrix, --only, --quick, --scaling or --state-bytes")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
