"""Memory pre-flight: the estimator's prediction for a run's exact flags, before anything big is allocated.

Every run records the prediction in ``metrics.json`` beside the measured peak. ``--memory-budget SIZE|auto``
refuses a run whose prediction does not fit, in one line naming the estimate, the budget, the largest term and
the cheapest listed change that would fit. The prediction is the estimator's tensor peak (docs/memory.md) plus
``RUNTIME_BYTES``, what the process holds before any tensor (Python, torch, transformers, tokenizer, data).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import replace
from typing import Any

from .config import TrainConfig
from .memory import estimate_config, human_bytes
from .units import parse_size

RUNTIME_BYTES = 512 * 2**20  # measured: RSS after importing leantrain.train, torch and transformers is ~380 MiB
# Changes the refusal may suggest, cheapest (least effect on the result or speed) first: (flag, overrides).
REMEDIES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--layerwise", {"layerwise": True, "grad_accum": 1}),
    ("--activation-checkpointing", {"activation_checkpointing": True}),
    ("--optim adamw8bit", {"optim": "adamw8bit"}),
    ("--dtype bf16", {"dtype": "bf16"}),
    ("--optim galore-adamw8bit", {"optim": "galore-adamw8bit"}),
)


class MemoryBudgetError(ValueError):
    """The run's predicted peak exceeds ``--memory-budget``."""


def available_bytes(device: str) -> int:
    """What ``auto`` allows: free GPU memory on CUDA, else the RAM the kernel reports as available."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(cfg: TrainConfig, device: str) -> int | None:
    if cfg.memory_budget is None:
        return None
    return available_bytes(device) if cfg.memory_budget == "auto" else parse_size(cfg.memory_budget)


def predicted_bytes(cfg: TrainConfig, device: str, vocab_size: int | None = None, **overrides: Any) -> int:
    """Estimated peak of the process: the estimator's tensor peak for ``cfg`` (one micro-batch) + the runtime."""
    return estimate_for(cfg, device, vocab_size, **overrides).total + RUNTIME_BYTES


def estimate_for(cfg: TrainConfig, device: str, vocab_size: int | None = None, **overrides: Any):
    """The estimator's report for ``cfg`` with config fields replaced by ``overrides``."""
    cfg = replace(cfg, **overrides) if overrides else cfg
    return estimate_config(cfg, device="cuda" if device.startswith("cuda") else "cpu", vocab_size=vocab_size)


def plan(cfg: TrainConfig, device: str) -> dict[str, Any]:
    """Pre-flight figures for metrics.json; refuses the run if ``--memory-budget`` is set and it does not fit."""
    budget = budget_bytes(cfg, device)
    try:
        report = estimate_for(cfg, device)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        if budget is not None:
            raise MemoryBudgetError(f"--memory-budget: this run cannot be estimated ({exc}); drop "
                                    "--memory-budget to run it unchecked") from exc
        return {"estimated_peak_bytes": None, "estimate_note": str(exc)}
    total = report.total + RUNTIME_BYTES
    if budget is not None and total > budget:
        raise MemoryBudgetError(refusal(cfg, device, report, total, budget))
    out = {"estimated_peak_bytes": total}
    return {**out, "memory_budget_bytes": budget} if budget is not None else out


def refusal(cfg: TrainConfig, device: str, report: Any, total: int, budget: int) -> str:
    """One line: estimate, budget, largest term, and the cheapest listed change that fits (or that none does)."""
    terms = {"weights": report.weights, "gradients": report.gradients, "optimizer states": report.optimizer_states,
             "activations": report.activations}
    largest = max(terms, key=terms.__getitem__)
    head = (f"--memory-budget {human_bytes(budget)}: this run needs an estimated {human_bytes(total)} (largest "
            f"term: {largest} {human_bytes(terms[largest])}; docs/memory.md)")
    missing = [(flag, o) for flag, o in REMEDIES
               if not all(getattr(cfg, k) == v for k, v in o.items() if k != "grad_accum")]
    for size in range(1, len(missing) + 1):  # the smallest set of changes that fits, cheapest first
        for combo in itertools.combinations(missing, size):
            if sum("optim" in o for _, o in combo) > 1:
                continue
            after = _try_predict(cfg, device, {k: v for _, o in combo for k, v in o.items()})
            if after is None or after > budget:
                continue
            if size == 1:
                return f"{head}; {combo[0][0]} saves {human_bytes(total - after)} and fits ({human_bytes(after)})"
            flags = " ".join(f for f, _ in combo)
            return f"{head}; no single change fits, together {flags} fit ({human_bytes(after)})"
    return f"{head}; no combination of {', '.join(f for f, _ in missing)} fits: use a smaller model or batch"


def _try_predict(cfg: TrainConfig, device: str, overrides: dict[str, Any]) -> int | None:
    try:
        return predicted_bytes(cfg, device, **overrides)
    except (ValueError, KeyError):
        return None
