"""Several seeds and learning rates of the main job, per method: mean ± std of validation accuracy and loss.

`leantrain compare` runs each method once (seed 0, default learning rate). The issues ask for more: a learning-rate
sweep for the projected optimizers, several seeds for 8-bit vs fp32 AdamW, every SHiRA mask. This script is a
named grid of config overrides for the experiment engine (`leantrain.experiments`: one process per run, `--jobs`
at a time, OMP_NUM_THREADS=1 per process; finished runs are cached by config hash, so an interrupted sweep
resumes), and writes results.json plus a markdown table of per-configuration means.

    .venv/bin/python benchmarks/main_job_sweep.py [GRID] [--out runs/sweep] [--jobs 2] [--steps 120] [--seeds 0,1,2]

Grids: ``lr`` (seed 0, a few learning rates per method), ``seeds`` (every config `leantrain reproduce` uses, at its
validated learning rate, several seeds: the very runs of the reproduce tables), ``masks`` (SHiRA random / magnitude
/ gradient / snip vs LoRA and MiSS at the default lr), ``table`` (the default: print the table of an existing --out
and exit). Steps, data sizes, configs, learning rates and seeds come from ``leantrain.experiments.definitions``
(one copy, shared with `leantrain reproduce`); after an ``lr`` run, ``table`` says where the grid's choice differs
from the recorded one. ``--quick`` runs the grid on the random tiny BERT for 2 steps (a smoke run, into
runs/sweep-quick).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from leantrain.atomic import write_text_atomic
from leantrain.experiments import Column, Experiment, Result, format_table, run_experiments
from leantrain.experiments.definitions import (
    LR_GRID,
    MAIN_JOB,
    MAIN_JOB_QUICK,
    MAIN_JOB_SEEDED,
    SEEDS,
    SWEPT_LR,
    lr_text,
    main_job_experiment,
    main_job_runs,
)

ROOT = Path(__file__).resolve().parents[1]

METRICS = ("val_accuracy", "val_loss", "optimizer_state_bytes", "sec_per_step", "trainable_params")
COLUMNS = [Column("config", "label"), Column("lr", lambda r: lr_text(r["lr"])),
           Column("seeds", "seed", combine="each", sep=","),
           Column("val acc mean ± std", "val_accuracy", ".4f"), Column("val loss mean ± std", "val_loss", ".4f"),
           Column("per-seed acc", "val_accuracy", ".4f", combine="each"),
           Column("optimizer state MiB", "optimizer_state_bytes", ".1f", 2.0**-20)]
MASKS = ["lora", "miss", "shira-random", "shira-magnitude", "shira-gradient", "shira-snip"]


def grid(name: str, seeds: list[int]) -> list[Experiment]:
    """The experiments of a named grid (``seeds``: the runs every ``leantrain reproduce`` table is made of)."""
    if name == "lr":
        return [main_job_experiment(label, 0, lr) for label, lrs in LR_GRID.items() for lr in lrs]
    if name == "seeds":
        return main_job_runs(MAIN_JOB_SEEDED, seeds)
    if name == "masks":
        return [main_job_experiment(label, seed, None) for label in MASKS for seed in seeds]
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
    ap.add_argument("--steps", type=int, default=MAIN_JOB["steps"])
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--only", default=None, help="comma list of config labels to keep from the grid")
    ap.add_argument("--quick", action="store_true", help="tiny random BERT, 2 steps (smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result rows here")
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "runs" / ("sweep-quick" if args.quick else "sweep")
    return args


def run_grid(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Run (or reuse) the grid's runs and return every row of --out (earlier grids included)."""
    todo = grid(args.grid, [int(s) for s in args.seeds.split(",")])
    if args.only:
        keep = set(args.only.split(","))
        todo = [e for e in todo if e.tags["config"] in keep]
    base = {**(MAIN_JOB_QUICK if args.quick else {**MAIN_JOB, "steps": args.steps}), "progress": False}
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
    best = best_lrs(rows)
    print("best lr by seed-0 validation loss:", best)
    changed = {k: v for k, v in best.items() if SWEPT_LR.get(k) != v}
    if changed:
        print(f"differs from SWEPT_LR in leantrain/experiments/definitions.py (the seeds grid and `leantrain "
              f"reproduce` use that): {changed}")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
