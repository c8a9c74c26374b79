"""Multi-adapter fusion on real text: concept loss of SHiRA vs LoRA adapters of equal size on the embedded MiniLM.

Paper claim (Bhardwaj et al., *Rapid Switching and Multi-Adapter Fusion via Sparse High Rank Adapters*,
https://arxiv.org/abs/2407.16712): fusing several SHiRA adapters loses less of each adapter's task quality
("concept loss") than fusing LoRA adapters. ``benchmarks/fusion.py`` tests this on a synthetic MLP; this script
uses the bundled text tasks and leantrain's own data/model/training code (``ClassificationTask``, the
``leantrain train`` method builders, and the pieces of ``leantrain.run`` / ``leantrain.loop`` a multi-adapter
setup can share: calibration batches, the head group and its lr rule, the optimizer, the schedule and the training
closure), offline.

Per seed: one frozen encoder (MiniLM), one task per data set (default: "vader" 3-class sentiment, "bible"
7-class KJV division), each with its own fresh linear head. For each method an adapter is trained per task
together with that task's head (the other adapter inactive), then every task is evaluated with its own head
  (1) head only on the base encoder (a head trained on the frozen base, no adapter),
  (2) its own adapter alone,
  (3) all adapters fused into the base weights (``adapters.merge(encoder, names)``; SHiRA: in-place scatter of
      the K entries of each adapter, LoRA: both ΔW = s·BA added), then ``unmerge`` (checked to restore W).
concept loss = acc(alone) - acc(fused).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion_text.py [--quick] [--json PATH] [--seeds 1]
        [--methods shira,lora,shira-snip] [--steps 100] [--train-size 2000] [--val-size 500] [--lr LR]
    .venv/bin/python benchmarks/fusion_text.py --from-json a.json b.json   # pool seeds of earlier runs, re-plot
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leantrain import adapters
from leantrain.adapters.inject import trainable_adapter_parameters
from leantrain.classify import ClassificationTask
from leantrain.config import TrainConfig
from leantrain.loop import Closure, set_learning_rates
from leantrain.methods import get_method
from leantrain.run import base_lr, build_optimizer_for, calibration, head_group

# benchmark label -> (leantrain method, TrainConfig overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "shira": ("shira", {"mask": "random"}),
    "shira-snip": ("shira", {"mask": "snip"}),
    "lora": ("lora", {}),
}
NAMES = "ABCDEFGH"  # adapter names, one per task (data paths may contain dots, which adapter names may not)


def build_tasks(cfg: TrainConfig, data: list[str]) -> tuple[nn.Module, list[ClassificationTask]]:
    """One ClassificationTask per data set, all sharing one frozen encoder; returns (pristine encoder, tasks).

    Each task keeps its own head (``task.model.classifier``); its initial state is stored in ``task.init_head``
    so every method starts from the same head init.
    """
    tasks = [ClassificationTask(replace(cfg, data=d), torch.device("cpu")) for d in data]
    encoder = tasks[0].model.encoder
    for p in encoder.parameters():
        p.requires_grad_(False)
    for task in tasks:
        task.model.encoder = encoder
        task.init_head = copy.deepcopy(task.model.classifier.state_dict())
    return encoder, tasks


def use_encoder(tasks: list[ClassificationTask], encoder: nn.Module) -> None:
    """Point every task at ``encoder`` and reset the heads to their initial state (fresh heads per method)."""
    for task in tasks:
        task.model.encoder = encoder
        task.model.classifier.load_state_dict(task.init_head)


def fit(task: ClassificationTask, groups: list[dict], cfg: TrainConfig, desc: str) -> float:
    """``cfg.steps`` steps of ``leantrain train``'s loop (schedule, closure with clipping); returns the last loss."""
    optimizer = build_optimizer_for(cfg, groups, groups[0]["lr"])
    closure = Closure(task, optimizer, cfg)
    task.model.train()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(cfg.steps), desc=desc, leave=False, unit="step", disable=not cfg.progress):
        closure.step = step
        set_learning_rates(optimizer, step, cfg.steps, cfg.warmup_ratio)
        loss = optimizer.step(closure)
    task.model.eval()
    return loss.item()


def head_only(encoder: nn.Module, tasks: list[ClassificationTask], cfg: TrainConfig) -> list[float]:
    """Accuracy of a head trained on the frozen base encoder (no adapter), per task."""
    use_encoder(tasks, encoder)
    out = []
    for i, task in enumerate(tasks):
        fit(task, [head_group(task.model, cfg, get_method("head").default_lr)], cfg, desc=f"head-only {NAMES[i]}")
        out.append(task.evaluate()["accuracy"])
    return out


def train_adapters(label: str, base: nn.Module, tasks: list[ClassificationTask], cfg: TrainConfig) -> nn.Module:
    """A copy of ``base`` holding one trained adapter per task (named A, B, ...), heads trained alongside."""
    name, overrides = METHODS[label]
    method = get_method(name)
    encoder = copy.deepcopy(base)
    use_encoder(tasks, encoder)
    lr = base_lr(cfg, method)
    for i, task in enumerate(tasks):
        # Same adapter config as `leantrain train --method NAME`; a different mask seed per adapter (equal seeds
        # would give two random SHiRA adapters the very same positions).
        config = method.build(replace(cfg, seed=1000 * cfg.seed + i, **overrides))
        if adapters.adapter_names(encoder):
            adapters.set_active(encoder, [])  # calibration (SNIP) and training see the base + this adapter only
        torch.manual_seed(1000 * cfg.seed + i)  # LoRA's A init
        adapters.inject(encoder, config, NAMES[i], calibration(task))  # freezes the encoder except this adapter
        adapters.set_active(encoder, [NAMES[i]])
        params = [p for _, p in trainable_adapter_parameters(encoder, NAMES[i])]
        fit(task, [{"params": params, "name": "adapter", "lr": lr}, head_group(task.model, cfg, lr)], cfg,
            desc=f"{label} {NAMES[i]}")
        for p in task.model.classifier.parameters():
            p.requires_grad_(False)
    return encoder


def base_weights(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the targeted base weights (what merge writes into)."""
    return {n: layer.base_layer.weight.detach().clone() for n, layer in adapters.adapter_layers(encoder)}


def _overlap(encoder: nn.Module, names: list[str]) -> float | None:
    """Share of the second SHiRA adapter's entries that the first one also trains (None for non-SHiRA)."""
    both = total = 0
    for _, layer in adapters.adapter_layers(encoder):
        a, b = (layer.adapters[n] for n in names[:2])
        if not hasattr(a, "flat"):
            return None
        both += torch.isin(b.flat, a.flat).sum().item()
        total += b.flat.numel()
    return both / max(1, total)


@torch.no_grad()
def fusion_scores(encoder: nn.Module, tasks: list[ClassificationTask]) -> dict[str, Any]:
    """Accuracies with each adapter alone and with all adapters fused into the base weights (then unmerged)."""
    names = [NAMES[i] for i in range(len(tasks))]
    use = [t.model.encoder is encoder for t in tasks]
    assert all(use), "tasks must point at the encoder under test"
    out: dict[str, Any] = {"alone": [], "fused": []}
    for i, task in enumerate(tasks):
        adapters.set_active(encoder, [names[i]])
        out["alone"].append(task.evaluate()["accuracy"])
    before = base_weights(encoder)
    adapters.set_active(encoder, names)
    adapters.merge(encoder, names)
    fused = base_weights(encoder)
    out["fused"] = [task.evaluate()["accuracy"] for task in tasks]
    adapters.unmerge(encoder)
    after = base_weights(encoder)
    out["fused_weight_change"] = max((fused[n] - before[n]).abs().max().item() for n in before)
    out["restore_max_error"] = max((after[n] - before[n]).abs().max().item() for n in before)
    out["restored_exact"] = all(torch.equal(after[n], before[n]) for n in before)
    out["trainable_per_adapter"] = sum(p.numel() for _, p in trainable_adapter_parameters(encoder, "A"))
    out["mask_overlap"] = _overlap(encoder, names)
    out["concept_loss"] = [a - f for a, f in zip(out["alone"], out["fused"])]
    return out


def run_seed(cfg: TrainConfig, data: list[str], labels: list[str]) -> dict[str, Any]:
    """Everything for one seed: head-only baseline, then per method adapters + fusion scores."""
    torch.manual_seed(cfg.seed)
    base, tasks = build_tasks(cfg, data)
    result: dict[str, Any] = {"seed": cfg.seed, "head_only": head_only(base, tasks, cfg), "methods": {}}
    for label in labels:
        started = time.time()
        encoder = train_adapters(label, base, tasks, cfg)
        result["methods"][label] = {**fusion_scores(encoder, tasks), "seconds": time.time() - started}
        del encoder
    return result


def summarise(runs: list[dict], labels: list[str], data: list[str]) -> list[dict]:
    """Mean over seeds per method."""
    rows = []
    mean = statistics.mean
    head = [mean(r["head_only"][t] for r in runs) for t in range(len(data))]
    for label in labels:
        ms = [r["methods"][label] for r in runs]
        row = {"method": label, "seeds": len(runs), "trainable_per_adapter": ms[0]["trainable_per_adapter"],
               "head_only": head}
        for key in ("alone", "fused", "concept_loss"):
            row[key] = [mean(m[key][t] for m in ms) for t in range(len(data))]
        row["concept_loss_mean"] = mean(row["concept_loss"])
        overlaps = [m["mask_overlap"] for m in ms if m["mask_overlap"] is not None]
        row["mask_overlap"] = mean(overlaps) if overlaps else None
        row["restored_exact"] = all(m["restored_exact"] for m in ms)
        row["restore_max_error"] = max(m["restore_max_error"] for m in ms)
        rows.append(row)
    return rows


def table(rows: list[dict], data: list[str]) -> str:
    def f(xs: list[float]) -> str:
        return " / ".join(f"{x:.3f}" for x in xs)

    tasks = " / ".join(data)
    header = (f"| method | trainable / adapter | head-only ({tasks}) | adapter alone | fused | concept loss "
              "| mean concept loss |")
    lines = [header, "|---|---:|---|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_per_adapter']:,} | {f(r['head_only'])} | {f(r['alone'])} | "
                     f"{f(r['fused'])} | {f(r['concept_loss'])} | **{r['concept_loss_mean']:.3f}** |")
    return "\n".join(lines)


def plot(rows: list[dict], data: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data) + 1, figsize=(4.2 * (len(data) + 1), 3.6))
    width = 0.8 / len(rows)
    for t, name in enumerate(data):
        ax = axes[t]
        for k, r in enumerate(rows):
            xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(3)]
            ax.bar(xs, [r["head_only"][t], r["alone"][t], r["fused"][t]], width, label=r["method"])
        ax.set_xticks(range(3), ["head only", "alone", "fused"])
        ax.set_ylabel("val accuracy")
        ax.set_title(name)
        low = min(min(r["head_only"][t], r["fused"][t]) for r in rows)
        ax.set_ylim(max(0.0, low - 0.1), None)
    ax = axes[-1]
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(data) + 1)]
        ax.bar(xs, r["concept_loss"] + [r["concept_loss_mean"]], width, label=r["method"])
    ax.set_xticks(range(len(data) + 1), list(data) + ["mean"])
    ax.set_ylabel("concept loss = alone - fused")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm", help="minilm (default) or tiny (random 2-layer BERT)")
    ap.add_argument("--data", default="vader,bible", help="comma-separated data sets, one adapter each")
    ap.add_argument("--methods", default="shira,lora", help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank; SHiRA K = rank*(out+in) per layer")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--val-size", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None,
                    help="adapter lr (default: leantrain's per-method default, 5e-4); the head trains at max(lr, 1e-3) "
                    "as in `leantrain train`, the head-only baseline at the head method's 2e-3")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (head/adapter init, masks, batch order)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20 steps, 256/128 sentences (checks the pipeline)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "fusion_text.png"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="PATH",
                    help="no training: pool the seeds of earlier --json files (same setup) and report/plot them")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    data = [d.strip() for d in args.data.split(",") if d.strip()]
    if not 2 <= len(data) <= len(NAMES):
        raise SystemExit(f"--data needs 2..{len(NAMES)} data sets, got {data}")
    if args.quick:
        args.steps, args.train_size, args.val_size = 20, 256, 128
    started = time.time()
    if args.from_json:
        runs, labels, data = pooled_runs(args)
    else:
        cfg = TrainConfig(model=args.model, train_size=args.train_size, val_size=args.val_size,
                          max_length=args.max_length, batch_size=args.batch_size, steps=args.steps, rank=args.rank,
                          lr=args.lr, progress=not args.no_progress)
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        runs = [run_seed(replace(cfg, seed=s), data, labels)
                for s in tqdm(seeds, desc="seeds", disable=args.no_progress or args.seeds == 1)]
    wall = time.time() - started
    rows = summarise(runs, labels, data)
    setup = (f"{args.model}, rank {args.rank}, {args.steps} steps x batch {args.batch_size}, "
             f"{args.train_size} train / {args.val_size} val per task, seed(s) "
             f"{', '.join(str(r['seed']) for r in runs)}{'' if args.lr is None else f', lr {args.lr:g}'}")
    took = f"pooled from {len(args.from_json)} file(s)" if args.from_json else f"{wall / 60:.1f} min"
    print(f"\nFusion of {len(data)} adapters ({setup}); val accuracy; {took}")
    print(table(rows, data))
    for r in rows:
        extra = f", mask overlap {r['mask_overlap']:.4f}" if r["mask_overlap"] is not None else ""
        per_seed = " ".join(f"{statistics.mean(run['methods'][r['method']]['concept_loss']):.3f}" for run in runs)
        print(f"{r['method']}: mean concept loss per seed {per_seed}; unmerge restored W exactly: "
              f"{r['restored_exact']} (max error {r['restore_max_error']:.2e}){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": vars(args), "wall_seconds": wall, "rows": rows,
                                               "runs": runs}, indent=2) + "\n")
    if args.plot:
        plot(rows, data, Path(args.plot), f"Fusion concept loss: {setup}")
    return 0


def pooled_runs(args: argparse.Namespace) -> tuple[list[dict], list[str], list[str]]:
    """Runs of several --json files whose setups agree except for the seeds (their setup replaces ``args``'s)."""
    ignore = {"seeds", "first_seed", "json", "plot", "no_progress", "threads", "from_json"}
    runs, first = [], None
    for path in args.from_json:
        saved = json.loads(Path(path).read_text())
        setup = {k: v for k, v in saved["setup"].items() if k not in ignore}
        if first is None:
            first = setup
        elif setup != first:
            diff = sorted(k for k in set(setup) | set(first) if setup.get(k) != first.get(k))
            raise SystemExit(f"--from-json: {path} differs from {args.from_json[0]} in {diff}")
        runs += saved["runs"]
    for key, value in first.items():
        setattr(args, key, value)
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--from-json: seed(s) repeated across files: {seeds}")
    labels = [m for m in args.methods.split(",") if m]
    return runs, labels, args.data.split(",")


if __name__ == "__main__":
    sys.exit(main())
