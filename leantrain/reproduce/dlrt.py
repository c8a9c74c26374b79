"""DLRT: rank-adaptive low-rank training vs dense on scikit-learn digits (Schotthöfer et al., NeurIPS 2022,
https://arxiv.org/abs/2205.13571). The paper's LeNet5/MNIST table is the reference; digits (8x8, 1797 images)
is the offline stand-in."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .common import write_report

PAPER = "Low-rank lottery tickets (DLRT), Schotthöfer et al. 2022, https://arxiv.org/abs/2205.13571"
# (τ, test acc %, eval compression %) from the paper's LeNet5/MNIST table (spec dlrt.md §6).
PAPER_ROWS = {None: (98.82, 0.0), 0.09: (98.16, 91.3), 0.15: (98.14, 95.3), 0.30: (97.45, 97.8)}


def run(out: Path, work: Path, quick: bool = False, progress: bool = True) -> Path:
    """Dense vs DLRT at three τ on digits (its own trainer, not the fine-tuning engine); the report's path."""
    from ..lowrank.digits import load_digits_split, plot_results, table, train_run

    data = load_digits_split(0)
    epochs = 2 if quick else 12
    kwargs = {"epochs": epochs, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "start_rank": 32, "data": data}
    rows = []
    cases = [("dense", None)] + [("dlrt", t) for t in (0.09, 0.15, 0.30)]
    bar = tqdm(total=len(cases) * epochs, desc="reproduce dlrt", disable=not progress, unit="epoch")
    for method, tau in cases:
        bar.set_postfix_str(f"{method} τ={tau}")
        rows.append(train_run(method, tau, progress=bar, **kwargs))
    bar.close()
    out = Path(out) / "dlrt"
    paths = plot_results(rows, out)
    paths[-1].replace(out / "dlrt.png")
    comparison = []
    for r in rows:
        paper_acc, paper_cr = PAPER_ROWS[r["tau"]]
        label = "dense" if r["tau"] is None else f"τ = {r['tau']}"
        comparison.append((f"{label}: test acc / compression", f"{paper_acc:.2f} % / {paper_cr:.1f} %",
                           f"{100 * r['accuracy']:.2f} % / {100 * r['compression']:.1f} %"))
    dense = rows[0]
    parts = []
    for r in rows[1:]:
        paper_acc, paper_cr = PAPER_ROWS[r["tau"]]
        parts.append(f"τ={r['tau']}: {100 * (dense['accuracy'] - r['accuracy']):.2f} points below dense at "
                     f"{100 * r['compression']:.1f} % compression (paper: {PAPER_ROWS[None][0] - paper_acc:.2f} "
                     f"points at {paper_cr:.1f} %)")
    worst = max(dense["accuracy"] - r["accuracy"] for r in rows[1:])
    explanation = ("Ours: " + "; ".join(parts) + ". Compression grows with τ as in the paper. "
                   + ("The accuracy cost is close to the paper's. " if worst < 0.03 else
                      "Our accuracy cost is larger than the paper's, most at large τ; likely reasons (not "
                      "separately measured): the digits MLP (64 inputs, "
                      f"{epochs} epochs, one seed, no tuning) is trained from a random low-rank start and the "
                      "truncation removes directions before the network has learned them, whereas the paper "
                      "tunes LeNet5 on MNIST for many more epochs. ")
                   + "Absolute accuracies differ because the task (8x8 digits, 450 test images) and network "
                   "(MLP 64-500-500-500-10 vs LeNet5) differ.")
    details = table(rows) + (f"\n\nSetup: {epochs} epochs, SGD lr 0.1, batch 32, start rank 32, seed 0, "
                             "KLS integrator with SGD inner steps.\n\n![ranks](dlrt_rank_vs_step.png)")
    return write_report(out, "dlrt", "DLRT vs dense (digits MLP)", PAPER, comparison, explanation, details,
                        "leantrain reproduce dlrt" + (" --quick" if quick else ""), quick)
