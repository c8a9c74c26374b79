"""Several seeds and learning rates of the main job, per method: mean ± std of validation accuracy and loss.

`leantrain compare` runs each method once (seed 0, default learning rate). The issues ask for more: a learning-rate
sweep for the projected optimizers, several seeds for 8-bit vs fp32 AdamW, every SHiRA mask. This script is a
named grid of config overrides for the experiment engine (`leantrain.experiments`: one process per run, `--jobs`
at a time, OMP_NUM_THREADS=1 per process; finished runs are cached by config hash, so an interrupted sweep
resumes), and writes results.json plus a markdown table of per-configuration means.

    .venv/bin/python benchmarks/main_job_sweep.py [GRID] [--out runs/sweep] [--jobs 2] [--steps 120] [--seeds 0,1,2]

Grids: ``lr`` (seed 0, a few learning rates for full / LoRA / GaLore / GradNormLoRP), ``seeds`` (each method at the
learning rate chosen from the lr grid, several seeds), ``masks`` (SHiRA random / magnitude / gradient / snip vs LoRA
and MiSS, seed 0), ``table`` (the default: print the table of an existing --out and exit). ``--quick`` runs the
grid on the random tiny BERT for 2 steps (a smoke run, into runs/sweep-quick).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from leantrain.atomic import write_text_atomic
from leantrain.experiments import Column, Experiment, Result, format_table, run_experiments

ROOT = Path(__file__).resolve().parents[1]

# label -> TrainConfig fields (method / optimizer / method settings); a learning rate and a seed are added per run.
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"method": "full", "optim": "adamw"},
    "adamw8bit": {"method": "full", "optim": "adamw8bit"},
    "lora": {"method": "lora", "optim": "adamw"},
    "miss": {"method": "miss", "optim": "adamw"},
    "galore": {"method": "full", "optim": "galore-adamw", "gap": 50},
    "galore8bit": {"method": "full", "optim": "galore-adamw8bit", "gap": 50},
    "gradnormlorp": {"method": "gradnormlorp", "optim": "adamw", "gap": 50},
    "shira-random": {"method": "shira", "mask": "random"},
    "shira-magnitude": {"method": "shira", "mask": "magnitude"},
    "shira-gradient": {"method": "shira", "mask": "gradient"},
    "shira-snip": {"method": "shira", "mask": "snip"},
}

LR_GRID = {
    "full": [2e-5, 5e-5, 1e-4, 2e-4],
    "lora": [1e-3, 2e-3, 5e-3],
    "galore": [1e-4, 3e-4, 1e-3, 3e-3],
    "gradnormlorp": [1e-4, 3e-4, 1e-3, 3e-3],
}
QUICK = {"model": "tiny", "train_size": 96, "val_size": 48, "max_length": 24, "batch_size": 8, "steps": 2}
METRICS = ("val_accuracy", "val_loss", "optimizer_state_bytes", "sec_per_step", "trainable_params")
COLUMNS = [Column("config", "label"), Column("lr", lambda r: lr_text(r["lr"])),
           Column("seeds", "seed", combine="each", sep=","),
           Column("val acc mean ± std", "val_accuracy", ".4f"), Column("val loss mean ± std", "val_loss", ".4f"),
           Column("per-seed acc", "val_accuracy", ".4f", combine="each"),
           Column("optimizer state MiB", "optimizer_state_bytes", ".1f", 2.0**-20)]


def lr_text(lr: float | None) -> str:
    return "default" if lr is None else f"{lr:g}"


def experiment(label: str, lr: float | None, seed: int) -> Experiment:
    """One grid point: the config's fields plus seed (and lr unless the method default is meant)."""
    overrides = {**CONFIGS[label], "seed": seed, **({} if lr is None else {"lr": lr})}
    return Experiment(f"{label}_lr{lr_text(lr)}_s{seed}", overrides, tags={"lr": lr, "seed": seed, "config": label})


def grid(name: str, seeds: list[int], best: dict[str, float]) -> list[Experiment]:
    """The experiments of a named grid."""
    if name == "lr":
        return [experiment(label, lr, 0) for label, lrs in LR_GRID.items() for lr in lrs]
    if name == "seeds":
        labels = ["full", "adamw8bit", "lora", "galore", "gradnormlorp"]
        lr_of = {**best, "adamw8bit": best.get("full"), "galore8bit": best.get("galore")}
        return [experiment(label, lr_of.get(label), seed) for label in labels for seed in seeds]
    if name == "masks":
        labels = ["lora", "miss", "shira-random", "shira-magnitude", "shira-gradient", "shira-snip"]
        return [experiment(label, None, seed) for label in labels for seed in seeds]
    raise ValueError(f"unknown grid {name!r}; choose lr, seeds, masks or table")


def result_row(result: Result) -> dict[str, Any]:
    """The results.json row of one run (the format of docs/results/sweeps/*.json)."""
    tags = result.experiment.tags
    row: dict[str, Any] = {"label": tags["config"], "lr": tags["lr"], "seed": tags["seed"]}
    if not result.ok:
        return {**row, "error": result.error}
    return {**row, **{k: result.metrics.get(k) for k in METRICS}, "run": result.experiment.name}


def collect(out: Path) -> list[dict]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _point(row: dict) -> tuple:
    return row["label"], row["lr"], row["seed"]


def merge(rows: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows of other grids stay; a re-run grid point replaces its old row."""
    replaced = {_point(r) for r in new}
    return [r for r in rows if _point(r) not in replaced] + new


def table(rows: list[dict]) -> str:
    """Per (config, lr): mean ± std over seeds; failed runs last."""
    ordered = sorted(rows, key=lambda r: (r["label"], r["lr"] or 0, r["seed"]))
    grouped = [{**r, "group": f"{r['label']} {lr_text(r['lr'])}"} for r in ordered]
    return format_table(grouped, COLUMNS, group_key="group")


def best_lrs(rows: list[dict]) -> dict[str, float]:
    """Per label, the lr of the lr grid with the lowest seed-0 validation loss."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if "error" in r or r["seed"] != 0 or r["lr"] is None or r["label"] not in LR_GRID:
            continue
        if r["label"] not in best or r["val_loss"] < best[r["label"]][0]:
            best[r["label"]] = (r["val_loss"], r["lr"])
    return {k: v[1] for k, v in best.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", nargs="?", default="table", choices=["lr", "seeds", "masks", "table"])
    ap.add_argument("--out", type=Path, default=None, help="runs and results.json (default: runs/sweep)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=None, help="comma list of config labels to keep from the grid")
    ap.add_argument("--quick", action="store_true", help="tiny random BERT, 2 steps (smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result rows here")
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "runs" / ("sweep-quick" if args.quick else "sweep")
    return args


def run_grid(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Run (or reuse) the grid's runs and return every row of --out (earlier grids included)."""
    todo = grid(args.grid, [int(s) for s in args.seeds.split(",")], best_lrs(rows))
    if args.only:
        keep = set(args.only.split(","))
        todo = [e for e in todo if e.tags["config"] in keep]
    base = {**({**QUICK} if args.quick else {"steps": args.steps}), "progress": False}
    results = run_experiments(todo, args.out, base=base, jobs=args.jobs, env={"OMP_NUM_THREADS": "1"},
                              desc=args.grid)
    rows = merge(rows, [result_row(r) for r in results])
    write_text_atomic(args.out / "results.json", json.dumps(rows, indent=1) + "\n")
    write_text_atomic(args.out / "results.md", table(rows) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = collect(args.out)
    if args.grid != "table":
        rows = run_grid(args, rows)
    print(table(rows))
    print("best lr by seed-0 validation loss:", best_lrs(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
