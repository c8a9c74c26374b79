"""Generic "method A vs method B" fine-tuning experiment used by miss/shira/blockwise8bit/gradnormlorp/galore.

Each of those modules is data: ``PAPER``, ``TITLE``, ``RUNS`` (main-job config labels of
``leantrain.experiments.definitions``, each run at its validated lr and every seed), optionally ``PLOT`` (the
metric of the second bar panel and its axis label), ``compare(groups)`` -> (paper-vs-ours rows with the gap and
the reason, explanation), and optionally ``extra(work, quick, progress)`` -> (more rows, a markdown section) for
runs outside the main job; ``run = pair_runner(__name__)`` turns that into the module's ``run``.
"""
from __future__ import annotations

import importlib
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..experiments import Experiment
from ..experiments.definitions import MAIN_JOB, SEEDS, lr_text, main_job_runs
from .common import MIB, ComparisonRow, bar_plot, finetune, runs_table, write_report

Rows = list[dict[str, Any]]  # one metrics dict per run (seed) of one config
Groups = dict[str, Rows]  # config label -> its runs, in RUNS order
Comparison = tuple[list[ComparisonRow], str]  # paper-vs-ours rows + explanation
Compare = Callable[[Groups], Comparison]


def planned_runs(name: str, quick: bool = False) -> list[Experiment]:
    """The main-job experiments of reproduce module ``name`` (quick: seed 0 only), before any ``quick-`` prefix."""
    module = importlib.import_module(f"leantrain.reproduce.{name}")
    return main_job_runs(module.RUNS, SEEDS[:1] if quick else SEEDS)


def pair_runner(module_name: str) -> Callable[..., Path]:
    """The ``run(out, work, quick, progress)`` of a reproduce module declared as data (read when called, so the
    module may define its fields after this line)."""
    def run(out: Path, work: Path, quick: bool = False, progress: bool = True) -> Path:
        module = sys.modules[module_name]
        metric, metric_label = getattr(module, "PLOT", ("optimizer_state_bytes", "optimizer state (MiB)"))
        name = module_name.rsplit(".", 1)[-1]
        return run_pair(name, title=module.TITLE, paper=module.PAPER, runs=planned_runs(name, quick), out=out,
                        work=work, quick=quick, progress=progress, compare=module.compare, metric=metric,
                        metric_label=metric_label, extra=getattr(module, "extra", None))

    return run


def setup_text(rows: Rows, quick: bool) -> str:
    """One sentence on the scale, learning rates and seeds of the runs, plus the data baselines."""
    if quick:
        return "Setup: tiny random BERT, 2 steps (smoke run)."
    job = MAIN_JOB
    lrs = ", ".join(f"{label} {lr_text(lr)}" for label, lr in dict.fromkeys((r["label"], r["lr"]) for r in rows))
    seeds = ",".join(str(s) for s in dict.fromkeys(r["seed"] for r in rows))
    text = (f"Setup: embedded MiniLM-L6, VADER sentiment, {job['train_size']:,} train / {job['val_size']:,} "
            f"validation sentences, {job['max_length']} tokens, batch {job['batch_size']}, {job['steps']} steps; "
            f"lr {lrs} (from docs/results/sweeps/main_job.json where swept, else the method default); seeds "
            f"{seeds}, CPU, one thread per run. Peak RSS is the whole process.")
    base = rows[0]
    if base.get("majority_baseline_accuracy") is not None:
        text += f" Majority-class baseline {100 * base['majority_baseline_accuracy']:.2f} %"
        if base.get("tfidf_baseline_accuracy") is not None:
            text += f", TF-IDF + logistic regression {100 * base['tfidf_baseline_accuracy']:.2f} %"
        text += " (same split)."
    return text


def run_pair(name: str, *, title: str, paper: str, runs: Sequence[Experiment], out: Path, work: Path, quick: bool,
             progress: bool, compare: Compare, metric: str = "optimizer_state_bytes",
             metric_label: str = "optimizer state (MiB)", extra: Callable[..., Comparison] | None = None) -> Path:
    """Train (or reuse) ``runs`` (and ``extra``'s), then write ``out/<name>/README.md`` (paper vs ours) + PNG."""
    rows = finetune(runs, work, quick, progress, desc=f"reproduce {name}")
    out = Path(out) / name
    bar_plot(out / f"{name}.png", rows, title, metric, metric_label, MIB)
    groups: Groups = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    comparison, explanation = compare(groups)
    details = runs_table(rows) + "\n\n" + setup_text(rows, quick)
    if extra is not None:
        more, section = extra(work, quick, progress)
        comparison, details = comparison + more, details + "\n\n" + section
    return write_report(out, name, title, paper, comparison, explanation, details,
                        f"leantrain reproduce {name}" + (" --quick" if quick else ""), quick)


def mean_sd(rows: Rows, key: str, scale: float = 1.0) -> tuple[float, float]:
    """Mean and sample sd over the runs (sd 0 for one run)."""
    values = [scale * r[key] for r in rows]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ms(rows: Rows, key: str, scale: float = 1.0, fmt: str = ".2f", unit: str = "") -> str:
    """``mean ± sd unit`` over the runs (just the value for one run)."""
    mean, sd = mean_sd(rows, key, scale)
    return f"{mean:{fmt}}{unit}" if len(rows) == 1 else f"{mean:{fmt}} ± {sd:{fmt}}{unit}"


def acc(rows: Rows) -> str:
    """Validation accuracy in percent, mean ± sd over seeds."""
    return ms(rows, "val_accuracy", 100, unit=" %")


def points(a: Rows, b: Rows) -> str:
    """Accuracy of a minus b in points (means over seeds), with the combined sd of the two means' difference."""
    (ma, sa), (mb, sb) = mean_sd(a, "val_accuracy", 100), mean_sd(b, "val_accuracy", 100)
    spread = (sa**2 / len(a) + sb**2 / len(b)) ** 0.5
    return f"{ma - mb:+.2f} points" + (f" (± {spread:.2f} s.e.)" if len(a) > 1 and len(b) > 1 else "")


def reduction(a: Rows, b: Rows, key: str) -> float:
    """Reduction of a's mean ``key`` relative to b's, in percent."""
    mb = mean_sd(b, key)[0]
    return 100 * (1 - mean_sd(a, key)[0] / mb) if mb else float("nan")
