"""Shared pieces of the reproduce experiments: one cached fine-tuning run, a report writer, a bar plot.

Fine-tuning runs use the embedded MiniLM on the offline VADER sentiment data through ``leantrain.train`` with
a small ``train_size``/``steps`` so each experiment fits in minutes on 2 CPU cores. A run folder under ``work``
is reused when its config.json matches (several experiments share the LoRA / full-AdamW baselines).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import savefig_atomic, write_text_atomic

MIB = 1024 * 1024

# Default scale of the fine-tuning runs (quick: a seconds-long smoke run on the random tiny BERT).
FULL = {"model": "minilm", "train_size": 320, "val_size": 160, "max_length": 32, "batch_size": 16, "steps": 30,
        "eval_every": 0, "save_every": 0}
QUICK = {"model": "tiny", "train_size": 64, "val_size": 32, "max_length": 16, "batch_size": 8, "steps": 2,
         "eval_every": 0, "save_every": 0}


def finetune(label: str, work: Path, quick: bool, progress: bool, **overrides: Any) -> dict[str, Any]:
    """Train (or reuse) ``work/<label>`` and return its metrics plus the label."""
    from ..config import TrainConfig
    from ..train import train

    out = Path(work) / ("quick-" + label if quick else label)
    values = {**(QUICK if quick else FULL), **overrides, "out": str(out), "progress": progress, "overwrite": True}
    cfg = TrainConfig(**values)
    saved, metrics_path = out / "config.json", out / "metrics.json"
    if saved.is_file() and metrics_path.is_file():
        old = json.loads(saved.read_text())
        new = json.loads(cfg.to_json())
        ignore = {"progress", "overwrite", "out"}
        if {k: v for k, v in old.items() if k not in ignore} == {k: v for k, v in new.items() if k not in ignore}:
            return {**json.loads(metrics_path.read_text()), "label": label, "reused": True}
    metrics = train(cfg)
    return {**metrics, "label": label, "reused": False}


def fmt_bytes(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


def runs_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of fine-tuning runs (accuracy, trainable params, optimizer state, peak RSS, speed)."""
    lines = ["| run | val acc | val loss | trainable params | optimizer state | peak RSS | s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} | {r['trainable_params']:,} | "
                     f"{fmt_bytes(r['optimizer_state_bytes'])} | {r['peak_rss_bytes'] / MIB:.0f} MiB | "
                     f"{r['sec_per_step']:.3f} |")
    return "\n".join(lines)


def bar_plot(path: Path, rows: Sequence[dict[str, Any]], title: str, metric: str = "optimizer_state_bytes",
             metric_label: str = "optimizer state (MiB)", scale: float = MIB) -> Path:
    """Two panels: validation accuracy and one memory metric per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(labels, [100 * r["val_accuracy"] for r in rows], color="C0")
    axes[0].set_ylabel("validation accuracy (%)")
    low = min(100 * r["val_accuracy"] for r in rows)
    axes[0].set_ylim(max(0, low - 10), 100)
    axes[1].bar(labels, [r[metric] / scale for r in rows], color="C1")
    axes[1].set_ylabel(metric_label)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


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
