"""Run outputs people read: per-step metrics (metrics.jsonl and/or TensorBoard events, ``--report-to``),
metrics.json (the summary), loss.png and, for classification, confusion.png."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .checkpoint import write_text_atomic
from .tfevents import EventWriter

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/events.out.tfevents.*: `tensorboard --logdir RUN`


class StepLog:
    """One record per step to every ``--report-to`` tracker: ``jsonl`` appends to metrics.jsonl (on resume, lines
    past the checkpoint's step are dropped first), ``tensorboard`` writes every numeric entry as a scalar event.
    The records of this invocation are also kept in memory (the summary reads them when there is no jsonl)."""

    def __init__(self, path: Path, resume_step: int | None = None, report_to: str = "jsonl"):
        self.path = Path(path)
        trackers = {t.strip() for t in report_to.split(",")}
        self.records: list[dict[str, Any]] = []
        self._handle = self._open_jsonl(resume_step) if "jsonl" in trackers else None
        self._events = (EventWriter(self.path.parent / TENSORBOARD_DIR, resume_step)
                        if "tensorboard" in trackers else None)

    def _open_jsonl(self, resume_step: int | None):
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        if self._events is not None:
            self._events.add_scalars(int(record.get("step", 0)), scalars(record))

    def history(self) -> list[dict[str, Any]]:
        """Every step record of the run: metrics.jsonl when it is kept, else this invocation's records."""
        return read_jsonl(self.path) if self._handle is not None else list(self.records)

    def close(self) -> None:
        for handle in (self._handle, self._events):
            if handle is not None:
                handle.close()


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record as TensorBoard tags (nested dicts as ``key/sub``; ``step`` is the axis)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


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


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str = "") -> Path | None:
    """Counts of true (rows) vs predicted (columns) labels, each cell annotated. Returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    top = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
