"""Run outputs people read: metrics.jsonl (one line per step), metrics.json (the summary) and loss.png."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .checkpoint import write_text_atomic


class StepLog:
    """Appends one JSON object per step; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._handle = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _step_of(line: str) -> float:
    """Step of a log line; a torn line (the process was killed mid-write) counts as past any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_summary(path: Path, metrics: dict[str, Any]) -> None:
    write_text_atomic(Path(path), json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over at most ``window`` values (shorter at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Train loss (raw and smoothed) and validation loss against step. Returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        ax.plot(steps, smooth(list(losses), max(1, len(losses) // 20)), color="tab:blue", label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
