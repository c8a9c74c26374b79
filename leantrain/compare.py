"""``leantrain compare``: the main job once per method, side by side, with a table and plots.

A list of (method, optimizer) overrides run by the experiment engine, one process per run, so each run's peak
RSS is its own and a crash in one method cannot take the others down. Runs are cached by config hash: re-running
the same command reuses finished runs and finishes an interrupted comparison.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .experiments import (
    Column,
    Experiment,
    Panel,
    Result,
    base_from_cli,
    format_table,
    plot_panels,
    run_experiments,
)

# Optimizers compared on full fine-tuning (label -> --optim); every registered method also runs with AdamW.
OPTIMIZER_ENTRIES = {"galore": "galore-adamw", "galore8bit": "galore-adamw8bit", "adamw8bit": "adamw8bit"}


def entries() -> dict[str, dict[str, str]]:
    """label -> TrainConfig overrides: each registered method that trains a classifier (with AdamW), then the
    optimizer variants. Read from the method registry, so a new method is comparable without editing this file;
    every other field comes from the options after `--`."""
    from .methods import available_methods, get_method

    table = {name: {"method": name, "optim": "adamw"} for name in available_methods()
             if "classify" in get_method(name).tasks}
    table.update({label: {"method": "full", "optim": optim} for label, optim in OPTIMIZER_ENTRIES.items()})
    return table


DEFAULT = ["full", "lora", "dora", "pissa", "vera", "miss", "shira", "galore", "gradnormlorp", "adamw8bit", "dlrt"]
SUMMARY_KEYS = ("val_accuracy", "val_loss", "trainable_params", "total_params", "optimizer_state_bytes", "grad_bytes",
                "peak_rss_bytes", "wall_time_s", "steps", "majority_baseline_accuracy", "tfidf_baseline_accuracy",
                "sec_per_step")
MIB = 2.0**-20
COLUMNS = [Column("run", "label"), Column("method", "method"), Column("optimizer", "optim"), Column("lr", "lr", "g"),
           Column("val acc", "val_accuracy", ".4f"), Column("val loss", "val_loss", ".4f"),
           Column("trainable params", "trainable_params", ","),
           Column("optimizer state MiB", "optimizer_state_bytes", ".1f", MIB),
           Column("est. peak MiB (tensors)", "estimated_peak_bytes", ".1f", MIB),
           Column("peak RSS MiB (process)", "peak_rss_bytes", ".1f", MIB), Column("s/step", "sec_per_step", ".3f")]
PANELS = [Panel("curve", "training loss (smoothed)", xlabel="step", ylabel="cross-entropy"),
          Panel("bar", "trainable-side memory (MiB)", y=("grad_bytes", "optimizer_state_bytes"),
                names=("gradients", "optimizer state"), scale=MIB, ylabel="MiB"),
          Panel("scatter", "accuracy vs gradient + optimizer-state memory", y=("val_accuracy",),
                x=("grad_bytes", "optimizer_state_bytes"), scale=MIB, xlabel="MiB", ylabel="validation accuracy",
                hlines=(("majority_baseline_accuracy", "majority"), ("tfidf_baseline_accuracy", "TF-IDF + LR")),
                symlog_x=True)]


def _estimate(result: Result) -> int | None:
    """Estimated peak bytes from the analytic model (None when the estimator cannot handle the config)."""
    from .config import TrainConfig
    from .memory import estimate_config

    labels_file = result.run_dir / "labels.json"
    num_labels = len(json.loads(labels_file.read_text())) if labels_file.is_file() else 2
    try:
        return estimate_config(TrainConfig.from_dict(result.config), num_labels=num_labels).total
    except Exception:  # noqa: BLE001 -- the estimate is an extra column: an unknown preset must not stop compare
        return None


def summary_row(result: Result) -> dict[str, Any]:
    """The results.json row of one run: label, method, optimizer, then its metrics (or its one-line error)."""
    entry = result.experiment.overrides
    row: dict[str, Any] = {"label": result.experiment.name, "method": entry["method"], "optim": entry["optim"],
                           "lr": result.config.get("lr")}  # the resolved lr (method default x optimizer lr_scale)
    if not result.ok:
        return {**row, "error": result.error}
    row.update({k: result.metrics.get(k) for k in SUMMARY_KEYS})
    row["estimated_peak_bytes"] = _estimate(result)
    return row


def format_compare(rows: list[dict[str, Any]]) -> str:
    """The results table, then the baselines of the split (the same for every run)."""
    ok = [r for r in rows if "error" not in r]
    lines = [format_table(rows, COLUMNS)]
    if ok:
        tfidf = ok[0].get("tfidf_baseline_accuracy")
        lines.append(f"\nBaselines on the same split: majority class {ok[0]['majority_baseline_accuracy']:.4f}, "
                     f"TF-IDF + logistic regression {float('nan') if tfidf is None else tfidf:.4f}.")
    return "\n".join(lines)


def run_compare(out: Path, labels: list[str], train_args: list[str], progress: bool = True) -> list[dict[str, Any]]:
    """Run the chosen entries with ``train_args`` for everything else; write results.json/.md and compare.png."""
    table = entries()
    unknown = [name for name in labels if name not in table]
    if unknown:
        raise ValueError(f"unknown compare entry {unknown[0]!r}; choose from: {', '.join(table)}")
    base = {**base_from_cli(train_args), "progress": False}
    experiments = [Experiment(label, table[label]) for label in labels]
    results = run_experiments(experiments, out, base=base, progress=progress, desc="compare")
    rows = [summary_row(r) for r in results]
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(out / "results.md", format_compare(rows) + "\n")
    plot_panels([r.row() for r in results], out / "compare.png", PANELS, size=(17, 4.8))
    return rows
