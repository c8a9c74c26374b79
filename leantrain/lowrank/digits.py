"""Dense MLP vs DLRT on scikit-learn's bundled 8×8 digits (offline): shared by ``leantrain dlrt-demo`` and
``benchmarks/dlrt.py``.

The MLP mirrors the paper's fully-connected MNIST nets at digits scale (64-500-500-500-10, ReLU); every hidden
Linear becomes a LowRankLinear trained from scratch by the KLS integrator, the 500→10 output layer stays dense
(the reference keeps the last layer at a fixed small rank). Paper: https://arxiv.org/abs/2205.13571.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..loop import Closure
from .convert import convert_to_lowrank, model_params
from .optimizer import KLSOptimizer

WIDTHS = (64, 500, 500, 500, 10)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, ...]:
    """Stratified train/test split of load_digits, standardised with the training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-3)
    return (xtr - mean) / std, torch.tensor(ytr), (xte - mean) / std, torch.tensor(yte)


def mlp(widths: Sequence[int] = WIDTHS, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


class DigitsTask:
    """The training split as a task for leantrain's training closure: ``batch(i)`` is the i-th minibatch of an
    epoch-wise shuffle drawn from one generator (the last batch of an epoch may be short), ``loss`` is cross-entropy.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, seed: int):
        self.model = self.forward_model = model
        self.x, self.y, self.batch_size = x, y, batch_size
        gen = torch.Generator().manual_seed(seed)
        self.orders = [torch.randperm(len(x), generator=gen) for _ in range(epochs)]

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(index, self.batches_per_epoch())
        rows = self.orders[epoch][pos * self.batch_size:(pos + 1) * self.batch_size]
        return {"x": self.x[rows], "y": self.y[rows]}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(self.forward_model(batch["x"]), batch["y"])


def build_digits_optimizer(model: nn.Module, method: str, lr: float, momentum: float, tau: float | None,
                           start_rank: int | None) -> torch.optim.Optimizer:
    """SGD for the dense MLP; for DLRT the hidden layers become low-rank (random init) under the KLS integrator."""
    if method == "dense":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if method != "dlrt":
        raise ValueError(f"method={method!r} must be 'dense' or 'dlrt'")
    hidden = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)][:-1]
    rank = None if start_rank is None else {n: min(start_rank, min(model.get_submodule(n).weight.shape))
                                            for n in hidden}
    convert_to_lowrank(model, hidden, rank=rank, init="random")
    return KLSOptimizer(model, inner="sgd", lr=lr, tau=tau, momentum=momentum)


def train_run(method: str = "dlrt", tau: float | None = 0.1, *, epochs: int = 30, batch_size: int = 64,
              lr: float = 0.05, momentum: float = 0.9, start_rank: int | None = None, widths=WIDTHS, seed: int = 0,
              data: tuple[torch.Tensor, ...] | None = None, progress: Any = None) -> dict[str, Any]:
    """Train one model; returns {"method", "tau", "accuracy", "params", "compression", "ranks", "sec_per_epoch",
    "rank_history": [(step, [ranks])], "loss"}. ``progress`` is an optional tqdm bar advanced once per epoch.

    Steps are ``optimizer.step(closure)`` with the closure of ``leantrain train`` (no clipping, no schedule)."""
    xtr, ytr, xte, yte = data if data is not None else load_digits_split(seed)
    model = mlp(widths, seed)
    dense_params = model_params(model)["params"]
    opt = build_digits_optimizer(model, method, lr, momentum, tau, start_rank)
    task = DigitsTask(model, xtr, ytr, batch_size, epochs, seed)
    closure = Closure(task, opt, TrainConfig(grad_clip=None))
    history: list[tuple[int, list[int]]] = []
    train_time, loss = 0.0, torch.tensor(float("nan"))
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(task.batches_per_epoch()):
            loss = opt.step(closure).detach()
            closure.step += 1
            if isinstance(opt, KLSOptimizer):
                history.append((closure.step, list(opt.ranks().values())))
        train_time += time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
    info = model_params(model)
    return {"method": method, "tau": tau if method == "dlrt" else None, "accuracy": accuracy(model, xte, yte),
            "params": int(info["params"]), "dense_params": int(dense_params),
            "compression": 1.0 - info["params"] / dense_params, "ranks": list(info["ranks"].values()),
            "sec_per_epoch": train_time / epochs, "loss": float(loss), "rank_history": history}


def plot_results(rows: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """docs-style PNGs: rank per layer vs step (one panel per τ) and accuracy vs compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    lr_rows = [r for r in rows if r["method"] == "dlrt"]
    if lr_rows:
        fig, axes = plt.subplots(1, len(lr_rows), figsize=(3.2 * len(lr_rows), 3), sharey=True, squeeze=False)
        for ax, row in zip(axes[0], lr_rows):
            steps = [s for s, _ in row["rank_history"]]
            for j in range(len(row["ranks"])):
                ax.plot(steps, [r[j] for _, r in row["rank_history"]], label=f"layer {j + 1}")
            ax.set_title(f"τ = {row['tau']}")
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[0][0].set_ylabel("rank")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "dlrt_rank_vs_step.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for row in rows:
        ax.scatter(100 * row["compression"], 100 * row["accuracy"], color="k" if row["method"] == "dense" else "C0")
        ax.annotate("dense" if row["method"] == "dense" else f"τ={row['tau']}",
                    (100 * row["compression"], 100 * row["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("compression (% of dense parameters removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "dlrt_accuracy_vs_compression.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table with ratios against the dense row (if present)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = ["| method | τ | test acc % | Δacc (pt) | params | compression % | s/epoch | time vs dense | ranks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dacc = f"{100 * (r['accuracy'] - dense['accuracy']):+.2f}" if dense else "-"
        speed = f"{r['sec_per_epoch'] / dense['sec_per_epoch']:.2f}x" if dense else "-"
        lines.append(f"| {r['method']} | {r['tau'] if r['tau'] is not None else '-'} | {100 * r['accuracy']:.2f} | "
                     f"{dacc} | {r['params']:,} | {100 * r['compression']:.1f} | {r['sec_per_epoch']:.3f} | {speed} | "
                     f"{r['ranks'] if r['ranks'] else '-'} |")
    return "\n".join(lines)
