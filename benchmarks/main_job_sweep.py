"""Several seeds and learning rates of the main job, per method: mean ± std of validation accuracy and loss.

`leantrain compare` runs each method once (seed 0, default learning rate). The issues ask for more: a learning-rate
sweep for the projected optimizers, several seeds for 8-bit vs fp32 AdamW, every SHiRA mask. This script runs a
named grid of `leantrain train` invocations (one process each, `--jobs` at a time, OMP_NUM_THREADS=1 per process),
skips runs whose metrics.json already exists (so an interrupted sweep resumes), and writes results.json plus a
markdown table of per-configuration means.

    .venv/bin/python benchmarks/main_job_sweep.py GRID [--out runs/sweep] [--jobs 2] [--steps 120] [--seeds 0,1,2]

Grids: ``lr`` (seed 0, a few learning rates for full / LoRA / GaLore / GradNormLoRP), ``seeds`` (each method at the
learning rate chosen from the lr grid, several seeds), ``masks`` (SHiRA random / magnitude / gradient / snip vs LoRA
and MiSS, seed 0), ``table`` (print the table of an existing --out and exit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]

# label -> train options (method / optimizer / method settings); a learning rate is appended per grid point.
CONFIGS: dict[str, list[str]] = {
    "full": ["--method", "full", "--optim", "adamw"],
    "adamw8bit": ["--method", "full", "--optim", "adamw8bit"],
    "lora": ["--method", "lora", "--optim", "adamw"],
    "miss": ["--method", "miss", "--optim", "adamw"],
    "galore": ["--method", "full", "--optim", "galore-adamw", "--gap", "50"],
    "galore8bit": ["--method", "full", "--optim", "galore-adamw8bit", "--gap", "50"],
    "gradnormlorp": ["--method", "gradnormlorp", "--optim", "adamw", "--gap", "50"],
    "shira-random": ["--method", "shira", "--mask", "random"],
    "shira-magnitude": ["--method", "shira", "--mask", "magnitude"],
    "shira-gradient": ["--method", "shira", "--mask", "gradient"],
    "shira-snip": ["--method", "shira", "--mask", "snip"],
}

LR_GRID = {
    "full": [2e-5, 5e-5, 1e-4, 2e-4],
    "lora": [1e-3, 2e-3, 5e-3],
    "galore": [1e-4, 3e-4, 1e-3, 3e-3],
    "gradnormlorp": [1e-4, 3e-4, 1e-3, 3e-3],
}


def grid(name: str, seeds: list[int], best: dict[str, float]) -> list[tuple[str, float | None, int]]:
    """(config label, lr or None for the method default, seed) triples of a named grid."""
    if name == "lr":
        return [(label, lr, 0) for label, lrs in LR_GRID.items() for lr in lrs]
    if name == "seeds":
        labels = ["full", "adamw8bit", "lora", "galore", "gradnormlorp"]
        lr_of = {**best, "adamw8bit": best.get("full"), "galore8bit": best.get("galore")}
        return [(label, lr_of.get(label), seed) for label in labels for seed in seeds]
    if name == "masks":
        labels = ["lora", "miss", "shira-random", "shira-magnitude", "shira-gradient", "shira-snip"]
        return [(label, None, seed) for label in labels for seed in seeds]
    raise ValueError(f"unknown grid {name!r}; choose lr, seeds, masks or table")


def run_dir(out: Path, label: str, lr: float | None, seed: int) -> Path:
    return out / f"{label}_lr{'default' if lr is None else f'{lr:g}'}_s{seed}"


def run_one(out: Path, label: str, lr: float | None, seed: int, steps: int) -> dict:
    d = run_dir(out, label, lr, seed)
    metrics = d / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "leantrain", "train", *CONFIGS[label], "--steps", str(steps), "--seed", str(seed),
               "--out", str(d), "--overwrite", "--no-progress"]
        if lr is not None:
            cmd += ["--lr", f"{lr:g}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        t0 = time.time()
        with open(str(d) + ".log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if proc.returncode != 0 or not metrics.is_file():
            lines = Path(str(d) + ".log").read_text().strip().splitlines()
            return {"label": label, "lr": lr, "seed": seed, "error": lines[-1] if lines else f"exit {proc.returncode}",
                    "wall_s": time.time() - t0}
    m = json.loads(metrics.read_text())
    return {"label": label, "lr": lr, "seed": seed, "val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"],
            "optimizer_state_bytes": m.get("optimizer_state_bytes"), "sec_per_step": m.get("sec_per_step"),
            "trainable_params": m.get("trainable_params"), "run": d.name}


def collect(out: Path) -> list[dict]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else []


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["label"], r["lr"])].append(r)
    lines = ["| config | lr | seeds | val acc mean ± std | val loss mean ± std | per-seed acc | optimizer state MiB |",
             "|---|---|---|---|---|---|---|"]

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    for (label, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        rs = sorted(rs, key=lambda r: r["seed"])
        state = rs[0].get("optimizer_state_bytes")
        lines.append(f"| {label} | {'default' if lr is None else f'{lr:g}'} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{ms([r['val_accuracy'] for r in rs])} | {ms([r['val_loss'] for r in rs])} | "
                     f"{' '.join(format(r['val_accuracy'], '.4f') for r in rs)} | "
                     f"{'—' if state is None else f'{state / 2**20:.1f}'} |")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        lines.append(f"\nfailed: {r['label']} lr={r['lr']} seed={r['seed']}: {r['error']}")
    return "\n".join(lines)


def best_lrs(rows: list[dict]) -> dict[str, float]:
    """Per label, the lr of the lr grid with the lowest seed-0 validation loss."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if "error" in r or r["seed"] != 0 or r["lr"] is None or r["label"] not in LR_GRID:
            continue
        if r["label"] not in best or r["val_loss"] < best[r["label"]][0]:
            best[r["label"]] = (r["val_loss"], r["lr"])
    return {k: v[1] for k, v in best.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", choices=["lr", "seeds", "masks", "table"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=None, help="comma list of config labels to keep from the grid")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = collect(args.out)
    if args.grid == "table":
        print(table(rows))
        print("best lr by seed-0 validation loss:", best_lrs(rows))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = grid(args.grid, seeds, best_lrs(rows))
    if args.only:
        keep = set(args.only.split(","))
        todo = [t for t in todo if t[0] in keep]
    done = {(r["label"], r["lr"], r["seed"]) for r in rows if "error" not in r}
    todo = [t for t in todo if t not in done]
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc=args.grid, unit="run") as bar:
        for result in pool.map(lambda t: run_one(args.out, *t, args.steps), todo):
            rows = [r for r in rows if (r["label"], r["lr"], r["seed"]) != (result["label"], result["lr"], result["seed"])]
            rows.append(result)
            (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
            bar.update()
            bar.write(f"{result['label']} lr={result['lr']} seed={result['seed']}: "
                      f"{result.get('val_accuracy', result.get('error'))}")
    print(table(rows))
    (args.out / "results.md").write_text(table(rows) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
