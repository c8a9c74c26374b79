"""DLRT: rank-adaptive low-rank training vs dense on scikit-learn digits (Schotthöfer et al., NeurIPS 2022,
https://arxiv.org/abs/2205.13571). The paper's LeNet5/MNIST table is the reference; digits (8x8, 1797 images)
is the offline stand-in (``reproduce dlrt-lenet5`` runs the paper's own setup). The runs are those of
``benchmarks/dlrt.py``: both call ``digits_runs`` with ``definitions.DIGITS``."""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..experiments.definitions import DIGITS, DIGITS_QUICK, DIGITS_TAUS, SEEDS
from .common import write_report

PAPER = "Low-rank lottery tickets (DLRT), Schotthöfer et al. 2022, https://arxiv.org/abs/2205.13571"
# (τ, test acc %, eval compression %) from the paper's LeNet5/MNIST table (spec dlrt.md §6).
PAPER_ROWS = {None: (98.82, 0.0), 0.09: (98.16, 91.3), 0.15: (98.14, 95.3), 0.30: (97.45, 97.8)}


def digits_runs(taus: Sequence[float], seeds: Sequence[int], settings: Mapping[str, Any],
                progress: Any = None, repeats: int = 1) -> list[list[dict[str, Any]]]:
    """Per seed (= data split and init): the dense MLP, then DLRT at each τ; ``progress`` is a tqdm bar (epochs).
    ``repeats`` > 1 runs dense and every τ that many times in turn and keeps the median s/epoch (same seed, same
    result; the methods alternate, so load from other jobs hits them alike)."""
    from ..lowrank.digits import load_digits_split, train_run

    per_seed = []
    for seed in seeds:
        data = load_digits_split(seed)
        common = {**settings, "seed": seed, "data": data, "progress": progress}
        start_rank = common.pop("start_rank")
        runs = []
        for _ in range(repeats):
            rows = [train_run("dense", None, **common)]
            rows += [train_run("dlrt", tau, start_rank=start_rank, **common) for tau in taus]
            runs.append(rows)
        for i, row in enumerate(runs[0]):
            row["sec_per_epoch"] = statistics.median(r[i]["sec_per_epoch"] for r in runs)
        per_seed.append(runs[0])
    return per_seed


def pool_seeds(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per case: accuracy/compression/params/time averaged over seeds (``accuracy_sd``: sample sd), the
    first seed's rank history, every seed's ranks and accuracy."""
    rows = []
    for i, first in enumerate(per_seed[0]):
        runs = [s[i] for s in per_seed]
        acc = [r["accuracy"] for r in runs]
        rows.append({**first, "accuracy": statistics.fmean(acc),
                     "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0, "accuracy_per_seed": acc,
                     "sec_per_epoch": statistics.fmean(r["sec_per_epoch"] for r in runs),
                     "params": round(statistics.fmean(r["params"] for r in runs)),
                     "compression": statistics.fmean(r["compression"] for r in runs),
                     "ranks_per_seed": [r["ranks"] for r in runs], "seeds": len(runs)})
    return rows


def _pm(mean: float, sd: float, seeds: int) -> str:
    return f"{mean:.2f} %" if seeds == 1 else f"{mean:.2f} ± {sd:.2f} %"


def comparison_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """Paper vs ours per τ; the gap compares the accuracy cost against dense (the tasks differ, so the absolute
    accuracies do not compare)."""
    dense = rows[0]
    out = []
    for r in rows:
        paper_acc, paper_cr = PAPER_ROWS[r["tau"]]
        ours = (f"{_pm(100 * r['accuracy'], 100 * r['accuracy_sd'], r['seeds'])} / "
                f"{100 * r['compression']:.1f} %")
        if r["tau"] is None:
            out.append(("dense: test acc / compression", f"{paper_acc:.2f} % / 0.0 %", ours, "—",
                        "different task and network: 8x8 digits MLP (450 test images) vs LeNet5 on MNIST"))
            continue
        cost, paper_cost = 100 * (dense["accuracy"] - r["accuracy"]), PAPER_ROWS[None][0] - paper_acc
        out.append((f"τ = {r['tau']}: test acc / compression", f"{paper_acc:.2f} % / {paper_cr:.1f} %", ours,
                    (f"cost vs dense {cost:.2f} vs {paper_cost:.2f} points; compression "
                    f"{100 * r['compression'] - paper_cr:+.1f} points"),
                    ("argued: the MLP's two 500x500 layers dominate the count and the rank is set within the first "
                    "steps from a random rank-32 start (docs/dlrt.md); see dlrt-lenet5 for the paper's setup")))
    return out


def run(out: Path, work: Path, quick: bool = False, progress: bool = True) -> Path:
    """Dense vs DLRT at the paper's τ on digits, every seed (its own trainer, not the fine-tuning engine)."""
    from ..lowrank.digits import plot_results, table

    settings, seeds = (DIGITS_QUICK, SEEDS[:1]) if quick else (DIGITS, SEEDS)
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    bar = tqdm(total=len(seeds) * (1 + len(DIGITS_TAUS)) * settings["epochs"], desc="reproduce dlrt",
               disable=not progress, unit="epoch")
    rows = pool_seeds(digits_runs(DIGITS_TAUS, seeds, settings, bar))
    bar.close()
    wall, load_after = time.perf_counter() - t0, os.getloadavg()[0]
    out = Path(out) / "dlrt"
    paths = plot_results(rows, out)
    paths[-1].replace(out / "dlrt.png")
    explanation = ("Compression grows with τ as in the paper; the accuracy cost against dense is the comparable "
                   "quantity (gap column). These are the runs of benchmarks/dlrt.py at the same definition "
                   "(leantrain/experiments/definitions.py: DIGITS, DIGITS_TAUS, SEEDS).")
    details = table(rows) + (
        f"\n\nSetup: MLP 64-500-500-500-10, {settings['epochs']} epochs, plain SGD lr {settings['lr']} (momentum "
        f"{settings['momentum']}), batch {settings['batch_size']}, start rank {settings['start_rank']}, KLS "
        f"integrator; seeds {','.join(map(str, seeds))} (split and init). This table: accuracy, params and s/epoch "
        "are means over seeds (± sd in the paper-vs-ours table), ranks are the first seed's. "
        f"This invocation: {wall / 60:.1f} min of training, one thread, load average {load_before:.1f} before and "
        f"{load_after:.1f} after on the shared 2-core machine.\n\n![ranks](dlrt_rank_vs_step.png)")
    return write_report(out, "dlrt", "DLRT vs dense (digits MLP)", PAPER, comparison_rows(rows), explanation,
                        details, "leantrain reproduce dlrt" + (" --quick" if quick else ""), quick)
