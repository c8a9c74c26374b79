"""Generic "method A vs method B" fine-tuning experiment used by miss/shira/blockwise8bit/gradnormlorp/galore.

Each of those modules is data: ``PAPER``, ``TITLE``, ``RUNS`` (label -> TrainConfig overrides), optionally
``PLOT`` (the metric of the second bar panel and its axis label), and ``compare(rows)`` -> (paper-vs-ours rows,
explanation); ``run = pair_runner(__name__)`` turns that into the module's ``run``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import FULL, MIB, bar_plot, finetune, runs_table, write_report

Rows = list[dict[str, Any]]  # one metrics dict per run, in RUNS order
Comparison = tuple[list[tuple[str, str, str]], str]  # (quantity, paper, ours) rows + explanation
Compare = Callable[[Rows], Comparison]


def pair_runner(module_name: str) -> Callable[..., Path]:
    """The ``run(out, work, quick, progress)`` of a reproduce module declared as data (read when called, so the
    module may define its fields after this line)."""
    def run(out: Path, work: Path, quick: bool = False, progress: bool = True) -> Path:
        module = sys.modules[module_name]
        metric, metric_label = getattr(module, "PLOT", ("optimizer_state_bytes", "optimizer state (MiB)"))
        return run_pair(module_name.rsplit(".", 1)[-1], title=module.TITLE, paper=module.PAPER, runs=module.RUNS,
                        out=out, work=work, quick=quick, progress=progress, compare=module.compare, metric=metric,
                        metric_label=metric_label)

    return run


def run_pair(name: str, *, title: str, paper: str, runs: Sequence[tuple[str, dict[str, Any]]], out: Path,
             work: Path, quick: bool, progress: bool, compare: Compare,
             metric: str = "optimizer_state_bytes", metric_label: str = "optimizer state (MiB)") -> Path:
    """Train (or reuse) ``runs``, then write ``out/<name>/README.md`` (paper vs ours from ``compare``) + PNG."""
    rows = finetune(runs, work, quick, progress, desc=f"reproduce {name}")
    out = Path(out) / name
    bar_plot(out / f"{name}.png", rows, title, metric, metric_label, MIB)
    comparison, explanation = compare(rows)
    scale = "tiny BERT, 2 steps" if quick else (
        f"embedded MiniLM-L6, VADER sentiment, {FULL['train_size']} train / {FULL['val_size']} validation sentences, "
        f"{FULL['max_length']} tokens, batch {FULL['batch_size']}, {FULL['steps']} steps")
    base = rows[0]
    baselines = ""
    if base.get("majority_baseline_accuracy") is not None:
        baselines = f" Majority-class baseline {100 * base['majority_baseline_accuracy']:.2f} %"
        if base.get("tfidf_baseline_accuracy") is not None:
            baselines += f", TF-IDF + logistic regression {100 * base['tfidf_baseline_accuracy']:.2f} %"
        baselines += " (same split)."
    details = runs_table(rows) + f"\n\nSetup: {scale}, seed 0, CPU. Peak RSS is the whole process.{baselines}"
    return write_report(out, name, title, paper, comparison, explanation, details,
                        f"leantrain reproduce {name}" + (" --quick" if quick else ""), quick)


def pct(a: float, b: float) -> str:
    """Reduction of a relative to b in percent."""
    return f"{100 * (1 - a / b):.1f} %" if b else "n/a"


def acc(r: dict[str, Any]) -> str:
    return f"{100 * r['val_accuracy']:.2f} %"
