"""Multi-adapter fusion: how much task quality each adapter loses when fused with another (concept loss),
SHiRA vs LoRA of equal trainable size. Paper claim: SHiRA fuses with less concept loss (arXiv 2407.16712).

Synthetic setup (CPU-minutes, no data download): a 3-layer ReLU MLP body is pre-trained on task 0; tasks A and B
are 4-way classifications labelled by two other random teacher networks on the same inputs. For each method an
adapter is trained on A and another on B (frozen body, each task has its own linear head), then both adapters are
fused into the body (``merge([A, B])``) and each task is evaluated again with its own head.
concept loss = accuracy(adapter alone) - accuracy(fused), averaged over seeds.

    .venv/bin/python benchmarks/fusion.py [--quick] [--json PATH] [--seeds 3] [--rank 4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leantrain import adapters
from leantrain.adapters.shira import ShiraConfig

D_IN, HIDDEN, CLASSES = 32, 128, 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(HIDDEN, CLASSES) for t in ("base", "A", "B")})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.body(x))


def teacher_labels(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(D_IN, 64, generator=g) / D_IN ** 0.5
    w2 = torch.randn(64, CLASSES, generator=g) / 8
    return (torch.tanh(x @ w1 * 2) @ w2).argmax(-1)


def fit(model: Net, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, task: str, steps: int,
        lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx], task), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model: Net, x: torch.Tensor, y: torch.Tensor, task: str) -> float:
    return (model(x, task).argmax(-1) == y).float().mean().item()


def run_seed(method: str, seed: int, rank: int, steps: int, lr: float) -> dict:
    torch.manual_seed(seed)
    x_tr, x_te = torch.randn(4000, D_IN), torch.randn(2000, D_IN)
    labels = {t: (teacher_labels(x_tr, 100 * seed + i), teacher_labels(x_te, 100 * seed + i))
              for i, t in enumerate(("base", "A", "B"))}
    model = Net()
    fit(model, list(model.body.parameters()) + list(model.heads["base"].parameters()), x_tr, labels["base"][0],
        "base", steps, 3e-3)  # "pre-training"
    targets = ["body.0", "body.2", "body.4"]
    out = {}
    for task in ("A", "B"):
        # head-only baseline: frozen body, trained head (measured before any adapter exists)
        head_only = Net()
        head_only.load_state_dict(model.state_dict())
        fit(head_only, list(head_only.heads[task].parameters()), x_tr, labels[task][0], task, steps, lr)
        out[f"head_only_{task}"] = accuracy(head_only, x_te, labels[task][1], task)
    for i, task in enumerate(("A", "B")):
        if method == "shira":
            config = ShiraConfig(r=rank, target_modules=targets, seed=1000 * seed + i)
        else:
            config = adapters.LoraConfig(r=rank, alpha=2 * rank, target_modules=targets)
        adapters.inject(model, config, name=task)  # freezes everything else, incl. the other adapter
        adapters.set_active(model, [task])
        params = [p for p in model.parameters() if p.requires_grad] + list(model.heads[task].parameters())
        fit(model, params, x_tr, labels[task][0], task, steps, lr)
        for p in model.heads[task].parameters():
            p.requires_grad_(False)
    for task in ("A", "B"):
        adapters.set_active(model, [task])
        out[f"solo_{task}"] = accuracy(model, x_te, labels[task][1], task)
    adapters.set_active(model, ["A", "B"])
    adapters.merge(model, ["A", "B"])  # fused into the body weights
    for task in ("A", "B"):
        out[f"fused_{task}"] = accuracy(model, x_te, labels[task][1], task)
    adapters.unmerge(model)
    out["trainable_per_adapter"] = sum(p.numel() for _, layer in adapters.adapter_layers(model)
                                       for p in layer.adapters["A"].parameters())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.steps = 1, 100
    rows = []
    for method in ("lora", "shira"):
        runs = [run_seed(method, s, args.rank, args.steps, args.lr) for s in range(args.seeds)]
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        loss = {t: statistics.mean(r[f"solo_{t}"] - r[f"fused_{t}"] for r in runs) for t in ("A", "B")}
        rows.append(dict(method=method, seeds=args.seeds, **mean, concept_loss_A=loss["A"],
                         concept_loss_B=loss["B"], concept_loss_mean=(loss["A"] + loss["B"]) / 2))
    print(f"\nFusion of two adapters (rank {args.rank}, {args.steps} steps, {args.seeds} seeds; test accuracy)")
    print(f"{'method':7} {'params':>7} {'head-only A/B':>14} {'solo A/B':>13} {'fused A/B':>13} {'concept loss':>13}")
    for r in rows:
        print(f"{r['method']:7} {r['trainable_per_adapter']:>7.0f} {r['head_only_A']:>6.3f}/{r['head_only_B']:.3f} "
              f"{r['solo_A']:>6.3f}/{r['solo_B']:.3f} {r['fused_A']:>6.3f}/{r['fused_B']:.3f} "
              f"{r['concept_loss_mean']:>13.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
