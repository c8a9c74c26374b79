"""``reproduce shira``'s second part: fusion concept loss of SHiRA vs LoRA adapters on the two text tasks
(https://arxiv.org/abs/2407.16712), at ``definitions.FUSION`` and every seed: the runs of
``benchmarks/fusion_text.py`` with no options. Each seed's result is kept as JSON under ``work`` and reused."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..experiments.definitions import FUSION, FUSION_QUICK, SEEDS
from .common import ComparisonRow
from .fusion import fusion_config, run_seed, summarise, table


def seed_result(settings: dict[str, Any], seed: int, folder: Path, progress: bool) -> dict[str, Any]:
    """One seed's fusion result, reused when ``folder`` holds it for the same settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"fusion-{digest}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg, data, labels = fusion_config(settings, progress)
    result = run_seed(dataclasses.replace(cfg, seed=seed), data, labels)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, default=str))
    return result


def _per_seed_loss(runs: list[dict[str, Any]], label: str) -> list[float]:
    return [100 * statistics.fmean(run["methods"][label]["concept_loss"]) for run in runs]


def extra(work: Path, quick: bool, progress: bool) -> tuple[list[ComparisonRow], str]:
    """Train (or reuse) every seed; the paper-vs-ours row and a markdown section."""
    settings, seeds = (FUSION_QUICK, SEEDS[:1]) if quick else (FUSION, SEEDS)
    _, data, labels = fusion_config(settings)
    runs = [seed_result(settings, seed, Path(work) / "fusion", progress) for seed in seeds]
    shira, lora = _per_seed_loss(runs, "shira"), _per_seed_loss(runs, "lora")
    diff = [a - b for a, b in zip(shira, lora)]

    def pm(xs: list[float]) -> str:
        return f"{statistics.fmean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

    row = ("fusion concept loss (alone − fused accuracy, mean of the 2 tasks), SHiRA vs LoRA",
           "SHiRA loses less than LoRA (2407.16712, LLM adapters; qualitative)",
           f"SHiRA {pm(shira)} vs LoRA {pm(lora)} points", f"SHiRA − LoRA {pm(diff)} points (paired by seed)",
           ("argued: each accuracy has a ≈ 2.2-point standard error from 500 validation sentences; the tasks' "
           "teachers are unrelated and share a 6-layer encoder (docs/shira_miss.md)"))
    setup = (f"{settings['model']}, rank {settings['rank']}, {settings['steps']} steps × batch "
             f"{settings['batch_size']}, {settings['train_size']} train / {settings['val_size']} validation "
             f"sentences per task ({', '.join(data)}), adapter lr {settings['lr']:g}, seeds "
             f"{','.join(map(str, seeds))}; means over seeds. Per-seed SHiRA / LoRA concept loss (points): "
             + "; ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(shira, lora)) + ".")
    section = "## Multi-adapter fusion (two text tasks)\n\n" + table(summarise(runs, labels, data), data) + \
        "\n\n" + setup
    return [row], section
