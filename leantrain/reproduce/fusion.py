"""Multi-adapter fusion on real text: concept loss of SHiRA vs LoRA adapters of equal size on the embedded MiniLM
(Bhardwaj et al., *Rapid Switching and Multi-Adapter Fusion via Sparse High Rank Adapters*,
https://arxiv.org/abs/2407.16712). The training and scoring of ``benchmarks/fusion_text.py`` (which documents the
protocol) and of ``leantrain reproduce shira``: one frozen encoder, one adapter + head per task, each task
evaluated with its adapter alone and with all adapters merged into the base weights; concept loss = alone − fused.
"""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import adapters
from ..adapters.inject import trainable_adapter_parameters
from ..classify import ClassificationTask
from ..config import TrainConfig
from ..loop import Closure, set_learning_rates
from ..methods import get_method
from ..run import base_lr, build_optimizer_for, calibration, head_group

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


def fusion_config(settings: Mapping[str, Any], progress: bool = False) -> tuple[TrainConfig, list[str], list[str]]:
    """``definitions.FUSION``-style settings -> (the shared TrainConfig, the data sets, the method labels)."""
    data = [d.strip() for d in str(settings["data"]).split(",") if d.strip()]
    labels = [m.strip() for m in str(settings["methods"]).split(",") if m.strip()]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        raise ValueError(f"fusion: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not 2 <= len(data) <= len(NAMES):
        raise ValueError(f"fusion: data needs 2..{len(NAMES)} data sets, got {data}")
    keys = ("model", "train_size", "val_size", "max_length", "batch_size", "steps", "rank", "lr")
    cfg = TrainConfig(**{k: settings[k] for k in keys}, progress=progress)
    return cfg, data, labels


def table(rows: list[dict], data: list[str]) -> str:
    """Markdown: per method, head-only / alone / fused accuracy and concept loss per task."""
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
