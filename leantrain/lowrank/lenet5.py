"""LeNet5 on the real MNIST, dense or DLRT: the headline table of the DLRT paper (Schotthöfer et al., NeurIPS 2022,
https://arxiv.org/abs/2205.13571), used by ``leantrain reproduce dlrt-lenet5``.

The network is the reference code's (COMPiLELab/DLRT-Net ``models_folder/Lenet5.py``): conv 1→20 (5×5), ReLU,
max-pool 2, conv 20→50 (5×5), ReLU, max-pool 2, flatten, 800→500, ReLU, 500→10; pixels scaled to [0, 1], no other
normalisation. Under DLRT the two convs and the 800→500 layer are low-rank from a random start at the reference's
r_max = min(n, m) // 2 (10, 25, 250) and the 500→10 output layer stays dense, stepped together with S -- the same
KLS integrator (``KLSOptimizer``) and the same training closure as ``leantrain train`` and the digits demo.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..loop import Closure
from .convert import convert_to_lowrank, model_params
from .digits import DigitsTask
from .optimizer import KLSOptimizer

LOWRANK = ("conv1", "conv2", "fc1")  # DLRT layers; fc2 stays dense as in the reference
# The reference's parameter count (reproduces every row of its cross_val_tab_paper.csv exactly): weights only,
# r·(n+1) per low-rank layer of n outputs, plus the dense 500x10 output weights; dense = 430,500.
REFERENCE_DENSE_WEIGHTS = 430_500
REFERENCE_OUTPUT_WEIGHTS = 5_000


def lenet5(seed: int = 0) -> nn.Sequential:
    """The reference LeNet5 with PyTorch's default init, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 20, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2, 2)),
        ("conv2", nn.Conv2d(20, 50, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2, 2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(800, 500)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(500, 10)),
    ]))


def holdout(labels: np.ndarray, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a stratified split of ``labels`` that depends only on ``seed`` (fixed
    at 0 by the experiment, so every run validates on the same images). Each class gives its share, rounded."""
    if not 0 <= val_size < len(labels):
        raise ValueError(f"val_size={val_size} must be in [0, {len(labels)})")
    rng = np.random.default_rng(seed)
    val = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        val.append(rng.permutation(members)[: round(val_size * len(members) / len(labels))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


class MnistTask(DigitsTask):
    """DigitsTask's seeded epoch-wise batches over uint8 images, scaled to float [0, 1] per batch (the 47 MB uint8
    array is what stays in memory, not a 188 MB float copy)."""

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        raw = super().batch(index)
        return {"x": raw["x"].float().div_(255.0).unsqueeze(1), "y": raw["y"].long()}


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on uint8 ``images`` in chunks (a 10k-image conv forward at once is ~0.5 GB)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float().div_(255.0).unsqueeze(1)
        y = labels[start:start + chunk].long()
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    n = max(1, len(images))
    return correct / n, loss / n


def reference_compression(model: nn.Module) -> float:
    """Compression as the reference code counts it (weights only, r·(n+1) per low-rank layer): comparable with the
    paper's column, which leaves out the m·r entries of V and the r×r core S."""
    from .layers import lowrank_layers

    layers = lowrank_layers(model)
    if not layers:
        return 0.0
    counted = sum(layer.rank * (layer.n + 1) for _, layer in layers) + REFERENCE_OUTPUT_WEIGHTS
    return 1.0 - counted / REFERENCE_DENSE_WEIGHTS


def build_optimizer(model: nn.Module, tau: float | None, lr: float, momentum: float) -> torch.optim.Optimizer:
    """SGD for dense (tau None); else conv1, conv2, fc1 become low-rank at r_max from a random start under KLS."""
    if tau is None:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rank = {name: min(model.get_submodule(name).weight.reshape(
        model.get_submodule(name).weight.shape[0], -1).shape) // 2 for name in LOWRANK}
    convert_to_lowrank(model, list(LOWRANK), rank=rank, init="random")
    return KLSOptimizer(model, inner="sgd", lr=lr, tau=tau, momentum=momentum)


def _epoch(opt: torch.optim.Optimizer, closure: Closure, steps: int, history: list) -> float:
    """``steps`` optimizer steps; appends (step, ranks) after each DLRT step; returns the mean training loss."""
    total = 0.0
    for _ in range(steps):
        total += float(opt.step(closure))
        closure.step += 1
        if isinstance(opt, KLSOptimizer):
            history.append((closure.step, list(opt.ranks().values())))
    return total / max(1, steps)


def train_lenet5(tau: float | None, data: dict[str, torch.Tensor], *, seed: int = 0, epochs: int = 1,
                 batch_size: int = 128, lr: float = 0.05, momentum: float = 0.0, steps_per_epoch: int | None = None,
                 progress: Any = None) -> dict[str, Any]:
    """Train one LeNet5 (dense if ``tau`` is None); ``data`` holds uint8 ``train_x``/``val_x``/``test_x`` and label
    tensors. Returns test/val accuracy and loss per epoch, final ranks, both compression counts, s/epoch (training
    only) and the rank history. ``steps_per_epoch`` caps an epoch (smoke tests); ``progress``: a tqdm bar, +1/epoch.
    """
    model = lenet5(seed)
    dense_params = model_params(model)["params"]
    opt = build_optimizer(model, tau, lr, momentum)
    task = MnistTask(model, data["train_x"], data["train_y"], batch_size, epochs, seed)
    closure = Closure(task, opt, TrainConfig(grad_clip=None))
    steps = task.batches_per_epoch() if steps_per_epoch is None else min(steps_per_epoch, task.batches_per_epoch())
    history: list[tuple[int, list[int]]] = []
    curve: list[dict[str, float]] = []
    train_time = 0.0
    for epoch in range(epochs):
        closure.step = epoch * task.batches_per_epoch()  # batch i of epoch e is the same whatever the step cap
        t0 = time.perf_counter()
        train_loss = _epoch(opt, closure, steps, history)
        train_time += time.perf_counter() - t0
        test_acc, test_loss = evaluate(model, data["test_x"], data["test_y"])
        val_acc, val_loss = evaluate(model, data["val_x"], data["val_y"]) if len(data["val_x"]) else (None, None)
        curve.append({"epoch": epoch + 1, "train_loss": train_loss, "test_accuracy": test_acc, "test_loss": test_loss,
                      "val_accuracy": val_acc, "val_loss": val_loss,
                      "ranks": list(opt.ranks().values()) if isinstance(opt, KLSOptimizer) else []})
        if progress is not None:
            progress.update(1)
    info = model_params(model)
    return {"method": "dense" if tau is None else "dlrt", "tau": tau, "seed": seed, "epochs": epochs,
            "accuracy": curve[-1]["test_accuracy"], "params": int(info["params"]), "dense_params": int(dense_params),
            "compression": 1.0 - info["params"] / dense_params, "reference_compression": reference_compression(model),
            "ranks": {k: int(v) for k, v in info["ranks"].items()}, "sec_per_epoch": train_time / epochs,
            "steps_per_epoch": steps, "curve": curve, "rank_history": history}


def mnist_data(val_size: int = 10_000, train_limit: int | None = None, test_limit: int | None = None
               ) -> dict[str, torch.Tensor]:
    """uint8 MNIST tensors: the 60k training images minus a stratified ``val_size`` hold-out (the reference trains
    on 50k and validates on 10k), and the official 10k test set; ``*_limit`` keep the first images (smoke tests)."""
    from ..mnist import load_mnist

    images, labels = load_mnist("train")
    train_idx, val_idx = holdout(labels, val_size)
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    test_x, test_y = load_mnist("test")
    test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    as_t = torch.from_numpy
    return {"train_x": as_t(images[train_idx]), "train_y": as_t(labels[train_idx]),
            "val_x": as_t(images[val_idx]), "val_y": as_t(labels[val_idx]),
            "test_x": as_t(np.ascontiguousarray(test_x)), "test_y": as_t(np.ascontiguousarray(test_y))}
