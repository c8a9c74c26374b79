"""One plot helper for experiment lists: a row of panels (loss curves, bars, scatter) from result rows.

matplotlib is optional (the ``plot`` extra): without it ``plot_panels`` prints one line and returns None, so a
comparison still writes its tables. Bars and scatter points use a group's mean over its runs (seeds); curves
are drawn per run from its ``metrics.jsonl``.
"""
from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import savefig_atomic
from ..report import read_jsonl, smooth
from .table import group_rows

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Panel:
    """One axes. ``kind``: "curve" (training loss per run, smoothed; ``val`` adds validation points),
    "bar" (``y`` keys stacked per group) or "scatter" (sum of ``x`` keys vs ``y[0]``, one labelled point per group).
    """

    kind: str
    title: str = ""
    y: tuple[str, ...] = ()
    x: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # legend names of stacked bars (default: the keys)
    scale: float = 1.0  # bar heights / scatter x are multiplied by this
    xlabel: str = ""
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    val: bool = False
    hlines: tuple[tuple[str, str], ...] = ()  # (key, legend): a dotted line at the first row's value
    symlog_x: bool = False


def _mean(rows: Sequence[Row], keys: Sequence[str]) -> float:
    return statistics.mean(sum(r[k] for k in keys) for r in rows)


def _curve(ax: Any, rows: Sequence[Row], panel: Panel) -> None:
    for i, row in enumerate(rows):
        records = read_jsonl(Path(row["run_dir"]) / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, smooth(list(losses), max(1, len(losses) // 15)), color=f"C{i}", label=row["label"])
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] if panel.val else []
        if panel.val and row.get("val_loss_before") is not None:
            val = [(0, row["val_loss_before"])] + val
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", ms=4, lw=0.8)


def _bar(ax: Any, rows: Sequence[Row], panel: Panel) -> None:
    groups = group_rows(rows)
    bottom = [0.0] * len(groups)
    for key, name in zip(panel.y, panel.names or panel.y):
        heights = [_mean(g, [key]) * panel.scale for g in groups.values()]
        ax.bar(list(groups), heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.grid(axis="y", alpha=0.3)


def _scatter(ax: Any, rows: Sequence[Row], panel: Panel) -> None:
    for label, group in group_rows(rows).items():
        x, y = _mean(group, panel.x) * panel.scale, _mean(group, panel.y[:1])
        ax.scatter(x, y)
        ax.annotate(label, (x, y), fontsize=8)
    if panel.symlog_x:
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(left=0)


DRAW = {"curve": _curve, "bar": _bar, "scatter": _scatter}


def _decorate(ax: Any, rows: Sequence[Row], panel: Panel) -> None:
    for (key, name), style in zip(panel.hlines, (":", "--", "-.")):
        if rows[0].get(key) is not None:
            ax.axhline(rows[0][key], ls=style, color="gray", label=name)
    ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    if len(ax.get_legend_handles_labels()[0]) > 1 or panel.hlines:
        ax.legend(fontsize=8)


def plot_panels(rows: Sequence[Row], path: Path, panels: Sequence[Panel], title: str = "",
                size: tuple[float, float] | None = None) -> Path | None:
    """Draw ``panels`` side by side for the successful rows and save a PNG (None: nothing to plot, or no
    matplotlib, which is reported in one line)."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot {path}: matplotlib is not installed (pip install 'leantrain[plot]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=size or (5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        DRAW[panel.kind](ax, ok, panel)
        _decorate(ax, ok, panel)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
