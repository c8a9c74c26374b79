"""Plot of docs/bigmodel.md: measured peak RSS per LLaMA size and recipe beside the pre-flight estimate.

    .venv/bin/python benchmarks/bigmodel_plot.py [--rows docs/results/bigmodel.json] [--out docs/img/bigmodel.png]

``--rows`` holds the measured rows of ``benchmarks/bigmodel.py --json`` (one list, rows from several runs). The
estimate line is the pre-flight's upper bound (GaLore's 32000-token vocabulary) for every size and recipe, so the
sizes that were not run -- because they cannot fit -- still show where each recipe crosses the machine's RAM.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bigmodel

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["60m", "130m", "350m", "1b", "7b"]
MACHINE_GIB = 24


def estimate_lines() -> dict[str, list[float]]:
    """Per recipe, the pre-flight upper-bound estimate (GiB) at every size."""
    return {r: [bigmodel.estimate_only(s, r) / bigmodel.GIB for s in SIZES] for r in bigmodel.RECIPES}


def largest_fitting(lines: dict[str, list[float]], budget_gib: float = MACHINE_GIB) -> dict[str, str | None]:
    """Per recipe, the largest size whose estimate fits the budget (None: not even the smallest)."""
    return {r: next((SIZES[i] for i in reversed(range(len(SIZES))) if v[i] <= budget_gib), None)
            for r, v in lines.items()}


def plot(rows: list[dict], lines: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    x = range(len(SIZES))
    for i, (recipe, est) in enumerate(lines.items()):
        color = f"C{i}"
        ax.plot(x, est, "--", color=color, alpha=0.6)
        per_size: dict[int, float] = {}  # the run without --return-freed-memory where both exist
        for r in sorted(rows, key=lambda r: not r.get("return_freed_memory")):
            if r["recipe"] == recipe and "peak_rss_gib" in r and r["size"] in SIZES:
                per_size[SIZES.index(r["size"])] = r["peak_rss_gib"]
        measured = list(per_size.items())
        if measured:
            ax.plot(*zip(*sorted(measured)), "o-", color=color, label=recipe)
        else:
            ax.plot([], [], "o-", color=color, label=recipe)
    ax.axhline(MACHINE_GIB, color="k", lw=1)
    ax.text(0, MACHINE_GIB * 1.08, f"this machine: {MACHINE_GIB} GiB RAM", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"LLaMA-{s}" for s in SIZES])
    ax.set_ylabel("GiB: solid measured peak RSS, dashed pre-flight\nestimate (upper bound: 32000-token vocabulary)")
    ax.set_title("One LLaMA pre-training step, batch 1 x 256 tokens, one process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, default=ROOT / "docs" / "results" / "bigmodel.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "bigmodel.png")
    args = ap.parse_args()
    lines = estimate_lines()
    plot(json.loads(args.rows.read_text()), lines, args.out)
    print("largest size whose estimate fits 24 GiB:", largest_fitting(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
