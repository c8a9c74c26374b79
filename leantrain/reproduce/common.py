"""Shared pieces of the reproduce experiments: the fine-tuning runs (through the experiment engine), their
table and bar plot, and the report writer.

Fine-tuning runs use the embedded MiniLM on the offline VADER sentiment data with a small ``train_size``/``steps``
so each experiment fits in minutes on 2 CPU cores. Each run is its own process (so "peak RSS" is that run's) under
``work/<label>``, cached by config hash: several experiments share the LoRA / full-AdamW baselines.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..experiments import Column, Experiment, Panel, format_table, plot_panels, run_experiments

MIB = 1024 * 1024

# Default scale of the fine-tuning runs (quick: a seconds-long smoke run on the random tiny BERT).
FULL = {"model": "minilm", "train_size": 320, "val_size": 160, "max_length": 32, "batch_size": 16, "steps": 30,
        "eval_every": 0, "save_every": 0}
QUICK = {"model": "tiny", "train_size": 64, "val_size": 32, "max_length": 16, "batch_size": 8, "steps": 2,
         "eval_every": 0, "save_every": 0}
RUN_COLUMNS = [Column("run", "label"), Column("val acc", "val_accuracy", ".4f"), Column("val loss", "val_loss", ".4f"),
               Column("trainable params", "trainable_params", ","),
               Column("optimizer state", "optimizer_state_bytes", ".2f", 1 / MIB, " MiB"),
               Column("peak RSS", "peak_rss_bytes", ".0f", 1 / MIB, " MiB"), Column("s/step", "sec_per_step", ".3f")]


class RunFailed(RuntimeError):
    """A fine-tuning run of an experiment failed (its one-line error is the message)."""


def finetune(runs: Sequence[tuple[str, dict[str, Any]]], work: Path, quick: bool, progress: bool,
             desc: str = "reproduce") -> list[dict[str, Any]]:
    """Train (or reuse) ``work/<label>`` for each (label, overrides); their metrics plus ``label``/``reused``."""
    experiments = [Experiment(("quick-" if quick else "") + label, overrides, group=label)
                   for label, overrides in runs]
    base = {**(QUICK if quick else FULL), "progress": False}
    results = run_experiments(experiments, Path(work), base=base, progress=progress, desc=desc)
    failed = next((r for r in results if not r.ok), None)
    if failed is not None:
        raise RunFailed(f"run {failed.experiment.label!r} failed: {failed.error}")
    return [{**r.metrics, "label": r.experiment.label, "reused": r.cached, "run_dir": str(r.run_dir)}
            for r in results]


def fmt_bytes(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


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


def write_report(out: Path, name: str, title: str, paper: str, comparison: list[tuple[str, str, str]],
                 explanation: str, details: str, command: str, quick: bool) -> Path:
    """README.md with the paper-vs-ours table first, then the per-run details."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Paper: {paper}", "",
             f"Command: `{command}`" + ("  (**--quick smoke run: numbers are meaningless**)" if quick else ""), "",
             "| quantity | paper | ours |", "|---|---|---|"]
    lines += [f"| {q} | {p} | {o} |" for q, p, o in comparison]
    lines += ["", explanation, "", "## Runs", "", details, "", f"![{name}]({name}.png)", ""]
    path = out / "README.md"
    write_text_atomic(path, "\n".join(lines))
    return path
