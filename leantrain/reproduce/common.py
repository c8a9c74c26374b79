"""Shared pieces of the reproduce experiments: the fine-tuning runs (through the experiment engine), their
table and bar plot, and the report writer.

Fine-tuning runs are the main job of ``leantrain.experiments.definitions`` (MiniLM-L6, VADER sentiment, 4,000 /
1,000 sentences, 120 steps, each config at its swept lr, 3 seeds), the very runs of ``benchmarks/main_job_sweep.py
seeds``. Each run is its own process (so "peak RSS" is that run's) under ``work/<name>``, cached by config hash:
several experiments share the LoRA / full-AdamW baselines, and ``--work runs/sweep`` reuses the sweep's runs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..experiments import Column, Experiment, Panel, format_table, plot_panels, run_experiments
from ..experiments.definitions import MAIN_JOB, MAIN_JOB_QUICK, lr_text

MIB = 1024 * 1024
# (quantity, paper, ours, gap, reason): one row of a report's paper-vs-ours table.
ComparisonRow = tuple[str, str, str, str, str]
RUN_COLUMNS = [Column("run", "label"), Column("lr", lambda r: lr_text(r["lr"])),
               Column("seeds", "seed", combine="each", sep=","),
               Column("val acc", "val_accuracy", ".4f"), Column("val loss", "val_loss", ".4f"),
               Column("trainable params", "trainable_params", ","),
               Column("optimizer state", "optimizer_state_bytes", ".2f", 1 / MIB, " MiB"),
               Column("peak RSS", "peak_rss_bytes", ".0f", 1 / MIB, " MiB"), Column("s/step", "sec_per_step", ".3f")]


class RunFailed(RuntimeError):
    """A fine-tuning run of an experiment failed (its one-line error is the message)."""


def finetune(experiments: Sequence[Experiment], work: Path, quick: bool, progress: bool,
             desc: str = "reproduce") -> list[dict[str, Any]]:
    """Train (or reuse) ``work/<name>`` for each main-job experiment; their metrics plus label, seed, lr and
    ``reused`` (quick runs get their own ``quick-`` folders and the tiny model)."""
    if quick:
        experiments = [dataclasses.replace(e, name=f"quick-{e.name}") for e in experiments]
    base = {**(MAIN_JOB_QUICK if quick else MAIN_JOB), "progress": False}
    # One thread per run, as the sweep runs them: thread count changes float reductions, so also the results.
    results = run_experiments(experiments, Path(work), base=base, progress=progress, env={"OMP_NUM_THREADS": "1"},
                              desc=desc)
    failed = next((r for r in results if not r.ok), None)
    if failed is not None:
        raise RunFailed(f"run {failed.experiment.name!r} failed: {failed.error}")
    return [{**r.metrics, "label": r.experiment.label, "seed": r.config["seed"], "lr": r.config["lr"],
             "reused": r.cached, "run_dir": str(r.run_dir)} for r in results]


def runs_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of fine-tuning runs (accuracy, trainable params, optimizer state, peak RSS, speed)."""
    return format_table(rows, RUN_COLUMNS)


def bar_plot(path: Path, rows: Sequence[dict[str, Any]], title: str, metric: str = "optimizer_state_bytes",
             metric_label: str = "optimizer state (MiB)", scale: float = MIB) -> Path | None:
    """Two panels: validation accuracy and one memory metric per run."""
    low = min(100 * r["val_accuracy"] for r in rows)
    panels = [Panel("bar", y=("val_accuracy",), scale=100, ylabel="validation accuracy (%)",
                    ylim=(max(0.0, low - 10), 100)),
              Panel("bar", y=(metric,), scale=1 / scale, ylabel=metric_label)]
    return plot_panels(rows, path, panels, title=title, size=(8, 3.2))


def write_report(out: Path, name: str, title: str, paper: str, comparison: Sequence[ComparisonRow],
                 explanation: str, details: str, command: str, quick: bool) -> Path:
    """README.md with the paper-vs-ours table (paper, ours, the gap, the measured or argued reason) first, then
    the per-run details."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Paper: {paper}", "",
             f"Command: `{command}`" + ("  (**--quick smoke run: numbers are meaningless**)" if quick else ""), "",
             "| quantity | paper | ours | gap | reason |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in comparison]
    lines += ["", explanation, "", "## Runs", "", details, "", f"![{name}]({name}.png)", ""]
    path = out / "README.md"
    write_text_atomic(path, "\n".join(lines))
    return path
