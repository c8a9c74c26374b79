"""Table of LoRA default vs --init lora-ga / corda-kpm / corda-ipm on the main job (docs/adapters.md).

Reads the run folders ``OUT/<init>-s<seed>`` written by (one process per run, OMP_NUM_THREADS=1):

    leantrain train --method lora --init INIT --seed SEED --eval-every 25 --no-progress --out OUT/INIT-sSEED

and prints, per init: final validation accuracy and loss (mean ± std over the seeds found), validation accuracy
at steps 25 and 50, and "steps to LoRA": the first evaluated step at which the run reaches the final accuracy of
the default-init LoRA run with the same seed (``-`` if it never does); then the mean validation accuracy at every
evaluated step.

    .venv/bin/python benchmarks/init_compare.py [--out runs/initcmp]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

INITS = ("default", "lora-ga", "corda-kpm", "corda-ipm")


def evals(run: Path) -> dict[int, tuple[float, float]]:
    """step -> (val accuracy, val loss) of every evaluation in the run's metrics.jsonl."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_accuracy" in row:
            out[int(row["step"])] = (float(row["val_accuracy"]), float(row["val_loss"]))
    return out


def complete_runs(root: Path, init: str) -> dict[int, dict[int, tuple[float, float]]]:
    """seed -> evaluations, for the finished runs (metrics.json written) of one init."""
    runs = {}
    for run in sorted(root.glob(f"{init}-s*")):
        if run.is_dir() and (run / "metrics.json").is_file():
            runs[int(run.name.rsplit("-s", 1)[1])] = evals(run)
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(root: Path) -> str:
    base = {seed: ev[max(ev)][0] for seed, ev in complete_runs(root, "default").items()}
    rows = ["| init | seeds | final val acc | final val loss | val acc @25 | val acc @50 | steps to LoRA's final acc |",
            "|---|---|---|---|---|---|---|"]
    for init in INITS:
        runs = complete_runs(root, init)
        if not runs:
            continue
        reach = []
        for seed, ev in runs.items():
            if seed in base:
                hit = [step for step, (acc, _) in sorted(ev.items()) if acc >= base[seed]]
                reach.append(str(hit[0]) if hit else "-")
        rows.append(f"| {init} | {','.join(map(str, runs))} | {mean_std([ev[max(ev)][0] for ev in runs.values()])} | "
                    f"{mean_std([ev[max(ev)][1] for ev in runs.values()])} | "
                    f"{mean_std([ev[25][0] for ev in runs.values() if 25 in ev])} | "
                    f"{mean_std([ev[50][0] for ev in runs.values() if 50 in ev])} | {', '.join(reach) or '-'} |")
    return "\n".join(rows)


def curves(root: Path) -> str:
    """Mean validation accuracy over the finished seeds at every evaluated step, one row per init."""
    data = {init: complete_runs(root, init) for init in INITS}
    steps = sorted({step for runs in data.values() for ev in runs.values() for step in ev})
    rows = ["| init \\ step | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for init, runs in data.items():
        if runs:
            cells = [statistics.mean(ev[s][0] for ev in runs.values() if s in ev) for s in steps]
            rows.append(f"| {init} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/initcmp", help="folder holding the <init>-s<seed> run folders")
    root = Path(parser.parse_args().out)
    print(table(root))
    print()
    print(curves(root))


if __name__ == "__main__":
    main()
