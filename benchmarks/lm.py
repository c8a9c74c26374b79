"""Language-model benchmark: SmolLM2-135M fine-tuning and tiny-LLaMA pre-training from scratch on KJV verses.

(a) fine-tunes with LoRA / MiSS / SHiRA / GaLore, (b) pre-trains with full Adam, GaLore, 8-bit GaLore,
GradNormLoRP, DLRT and the factorised low-rank baseline: the GaLore paper's (https://arxiv.org/abs/2403.03507,
Table 2) comparison in miniature; (c) ``--part sparse`` pre-trains ReLoRA (with its full-rank warm start) and
SLTrain (fp32 and 8-bit Adam states) beside full Adam, GaLore and low-rank, over ``--seeds``. Every run is ``leantrain.train`` in its own process (so peak RSS is per run), on
the same data, seed and init, through the experiment engine (``leantrain.experiments``: cached by config hash, so
a re-run reuses finished runs).

    .venv/bin/python benchmarks/lm.py [--quick] [--part finetune|pretrain|sparse|both] [--seeds 0,1,2] [--json PATH]

Writes docs/img/lm_finetune.png and docs/img/lm_pretrain.png (with --quick: into --out), prints both tables with
ratios.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

from leantrain.experiments import Column, Experiment, Panel, format_table, plot_panels, run_experiments
from leantrain.experiments.definitions import PRETRAIN as PRETRAIN_SETTINGS
from leantrain.experiments.definitions import PRETRAIN_RUNS

ROOT = Path(__file__).resolve().parent.parent
RUNNER = f"{Path(__file__).resolve()}:train_with_state_split"

# (label, method, optimizer, lr)
FINETUNE = [
    ("LoRA r=8", "lora", "adamw", 1e-3),
    ("MiSS r=8", "miss", "adamw", 1e-3),
    ("SHiRA r=8", "shira", "adamw", 1e-3),
    ("GaLore r=8", "full", "galore-adamw", 1e-4),
]
PRETRAIN = PRETRAIN_RUNS  # (label, method, optimizer, lr): the experiment `reproduce galore` runs too
# (c): (label, method, optimizer, lr, extra); the warm start and restart period suit a 60-step run
SPARSE = [
    ("full Adam", "full", "adamw", 3e-3, {}),
    ("GaLore", "full", "galore-adamw", 1e-2, {}),
    ("low-rank (W=BA)", "lowrank", "adamw", 3e-3, {}),
    ("ReLoRA (warm start 20, every 20)", "relora", "adamw", 3e-3, {"relora_warm_start": 20, "relora_every": 20}),
    ("SLTrain (delta 0.03)", "sltrain", "adamw", 3e-3, {}),
    ("SLTrain + 8-bit Adam", "sltrain", "adamw8bit", 3e-3, {}),
]
PROJECTED_GROUPS = ("linear", "lowrank", "gradnormlorp")
MIB = 2.0**-20


def finetune_base(steps: int) -> dict[str, Any]:
    return {"task": "causal-lm", "model": "smollm2", "data": "bible", "steps": steps, "batch_size": 4,
            "max_length": 64, "rank": 8, "alpha": 16.0, "train_size": None, "val_size": 16, "warmup_ratio": 0.1,
            "weight_decay": 0.0, "progress": False, "extra": {"eval_before": True}}


def pretrain_base(steps: int, preset: str) -> dict[str, Any]:
    """The shared tiny-LLaMA pre-training settings (leantrain/experiments/definitions.py) at ``steps`` / ``preset``."""
    return {**PRETRAIN_SETTINGS, "preset": preset, "steps": steps, "eval_every": max(1, steps // 5)}


def experiments(part: str, table: list[tuple[str, str, str, float]]) -> list[Experiment]:
    """One experiment per (label, method, optimizer, lr) row, in the run folders the benchmark always used."""
    return [Experiment(f"{part}_{method}_{optim}", {"method": method, "optim": optim, "lr": lr}, group=label)
            for label, method, optim, lr in table]


def sparse_experiments(seeds: list[int]) -> list[Experiment]:
    """(c): one experiment per (row, seed), seed-major (every row of seed 0 first), grouped by row."""
    return [Experiment(f"sparse_{method}_{optim}_{'_'.join(f'{k}{v}' for k, v in extra.items())}_s{seed}",
                       {"method": method, "optim": optim, "lr": lr, "seed": seed,
                        "extra": {"eval_before": True, **extra}}, group=label, tags={"seed": seed})
            for seed in seeds for label, method, optim, lr, extra in SPARSE]


# --- the runner (inside each run's own process) -----------------------------------------------------------------

def train_with_state_split(cfg: Any) -> dict[str, Any]:
    """``leantrain.train``, plus the optimizer-state bytes of the projected matrices vs the rest."""
    from leantrain.dist_utils import local_bytes, optimizer_state_bytes_local

    train_module = importlib.import_module("leantrain.train")  # the module (leantrain.train is also a function)
    captured: dict[str, Any] = {}
    build_run = train_module.build_run

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured["run"] = run = build_run(*args, **kwargs)
        return run

    train_module.build_run = capture
    try:
        metrics = train_module.train(cfg)
    finally:
        train_module.build_run = build_run
    opt = captured["run"].optimizer
    split = {"projected": 0, "other": 0}
    for group in opt.param_groups:
        size = sum(local_bytes(opt.state[p].values()) for p in group["params"] if p in opt.state)
        split["projected" if group.get("name") in PROJECTED_GROUPS else "other"] += size
    return {**metrics, "state_bytes_matrices": split["projected"], "state_bytes_other": split["other"],
            "inner_optimizer_state_bytes": optimizer_state_bytes_local(opt)}


# --- tables and plots -------------------------------------------------------------------------------------------

def _first(rows: list[dict], label: str | None = None) -> dict:
    """The reference row of a ratio column (the first successful one, or the one with ``label``)."""
    return next((r for r in rows if "error" not in r and label in (None, r["label"])), {})


def finetune_table(rows: list[dict]) -> str:
    ref = _first(rows)
    return format_table(rows, [
        Column("method", "label"), Column("optimizer", "optim"), Column("lr", "lr", "g"),
        Column("trainable params", "trainable_params", ","),
        Column("val ppl before", "val_perplexity_before", ".2f"), Column("val ppl after", "val_perplexity", ".2f"),
        Column("s/step", "sec_per_step", ".2f"),
        Column("step time vs LoRA", lambda r: r["sec_per_step"] / ref["sec_per_step"], ".2f", suffix="x"),
        Column("peak RSS (MiB)", "peak_rss_bytes", ".0f", MIB),
        Column("optimizer state (MiB)", "optimizer_state_bytes", ".2f", MIB)])


def _state(row: dict) -> int:
    return row["state_bytes_matrices"] + row["state_bytes_other"]


def pretrain_table(rows: list[dict]) -> str:
    full = _first(rows, "full Adam")
    return format_table(rows, [
        Column("method", "label"), Column("optimizer", "optim"), Column("lr", "lr", "g"),
        Column("params", "total_params", ","), Column("val ppl (init)", "val_perplexity_before", ".0f"),
        Column("final val ppl", "val_perplexity", ".1f"),
        Column("ppl vs full", lambda r: r["val_perplexity"] / full["val_perplexity"], ".2f", suffix="x"),
        Column("opt. state, matrices (KiB)", "state_bytes_matrices", ".0f", 1 / 1024),
        Column("opt. state, other (KiB)", "state_bytes_other", ".0f", 1 / 1024),
        Column("total state vs full", lambda r: _state(r) / _state(full), ".2f", suffix="x"),
        Column("s/step", "sec_per_step", ".3f")])


def sparse_table(rows: list[dict]) -> str:
    """(c): mean ± std over the seeds of each row (docs/lm.md's ReLoRA/SLTrain table)."""
    full = _first(rows, "full Adam")
    return format_table(rows, [
        Column("method", "label"), Column("optimizer", "optim"), Column("seeds", "seed", combine="each", sep=","),
        Column("train loss (last 20)", "train_loss_last", ".3f"), Column("final val ppl", "val_perplexity", ".1f"),
        Column("weights (KiB)", "param_bytes", ".0f", 1 / 1024),
        Column("opt. state (KiB)", "optimizer_state_bytes", ".0f", 1 / 1024),
        Column("weights + state vs full", lambda r: (r["param_bytes"] + r["optimizer_state_bytes"])
               / (full["param_bytes"] + full["optimizer_state_bytes"]), ".2f", suffix="x"),
        Column("s/step", "sec_per_step", ".2f")])


def curves(rows: list[dict], path: Path, title: str) -> None:
    panel = Panel("curve", title, val=True, xlabel="optimizer step",
                  ylabel="cross-entropy (nats/token); dashed = validation")
    plot_panels(rows, path, [panel], size=(7.5, 4.5))


# --- main -------------------------------------------------------------------------------------------------------

PARTS = {  # part -> (runs, base config from (steps, preset), table formatter, heading, plot title)
    "finetune": (FINETUNE, lambda steps, preset: finetune_base(steps), finetune_table,
                 "(a) SmolLM2-135M fine-tuning, {steps} steps of 4x64 tokens",
                 "SmolLM2-135M on KJV verses ({steps} steps, 4x64 tokens)"),
    "pretrain": (PRETRAIN, pretrain_base, pretrain_table,
                 "(b) LLaMA-{preset} pre-training from scratch, {steps} steps of 16x64 tokens",
                 "LLaMA-{preset} from scratch on KJV ({steps} steps, 16x64 tokens)"),
    "sparse": (SPARSE, pretrain_base, sparse_table,
               "(c) LLaMA-{preset} pre-training from scratch, ReLoRA and SLTrain, {steps} steps of 16x64 tokens",
               "LLaMA-{preset}: ReLoRA / SLTrain vs full, GaLore, low-rank ({steps} steps)"),
}


def run_part(part: str, steps: int, args: argparse.Namespace) -> list[dict]:
    """Run (or reuse) one part's runs, print its table and draw its loss curves."""
    runs, base, table, heading, title = PARTS[part]
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    exps = sparse_experiments(args.seeds) if part == "sparse" else experiments(part, runs)
    results = run_experiments(exps, Path(args.out), base=base(steps, args.preset), runner=RUNNER, env=env, desc=part)
    rows = [r.row() for r in results]
    print(f"\n{heading.format(steps=steps, preset=args.preset)}\n{table(rows)}")
    png = (Path(args.out) if args.quick else ROOT / "docs" / "img") / f"lm_{part}.png"
    curves(rows, png, title.format(steps=steps, preset=args.preset))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each (smoke test)")
    parser.add_argument("--part", choices=["finetune", "pretrain", "sparse", "both"], default="both",
                        help="both = finetune and pretrain; sparse = (c), run on its own")
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sparse-steps", type=int, default=60)
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                        help="seeds of --part sparse, comma-separated (default 0)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LM_BENCH_THREADS", "1")),
                        help="torch threads per run (1 is fastest when the 2 cores are shared)")
    parser.add_argument("--out", default=None,
                        help="run folders (default: runs/bench_lm, with --quick: runs/bench_lm-quick)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.out = args.out or str(ROOT / "runs" / ("bench_lm-quick" if args.quick else "bench_lm"))
    steps = {"finetune": 3, "pretrain": 10, "sparse": 10} if args.quick else {
        "finetune": args.finetune_steps, "pretrain": args.pretrain_steps, "sparse": args.sparse_steps}
    load = os.getloadavg()[0]
    report: dict[str, Any] = {"load_average_1min_at_start": load, "threads": args.threads}
    print(f"load average at start: {load:.1f} (2 shared cores); torch threads per run: {args.threads}")
    for part in ("finetune", "pretrain", "sparse"):
        if args.part == part or (args.part == "both" and part != "sparse"):
            report[part] = run_part(part, steps[part], args)
    report["load_average_1min_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    ok = all("error" not in r for part in ("finetune", "pretrain", "sparse") for r in report.get(part, []))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
