"""The validated settings of each ``leantrain reproduce`` experiment, read by its benchmark too.

``reproduce`` once ran 30 steps on 320 sentences while ``benchmarks/main_job_sweep.py`` ran 120 steps at swept
learning rates, and ``reproduce dlrt`` 12 epochs while ``benchmarks/dlrt.py`` ran 60: the two reported different
numbers for the same claim. Every step count, learning rate, seed list and data size now lives here once, and
``tests/test_reproduce_cli.py`` checks that each reproduce experiment and its benchmark resolve to the same runs.
"""
from __future__ import annotations

from typing import Any

from .engine import Experiment

SEEDS = (0, 1, 2)

# --- the main job: MiniLM-L6 fine-tuned on VADER sentiment (reproduce blockwise8bit/galore/gradnormlorp/miss/shira,
# benchmarks/main_job_sweep.py). The data sizes are TrainConfig's defaults, spelled out so a default change cannot
# silently change the experiment.
MAIN_JOB: dict[str, Any] = {"model": "minilm", "data": "vader", "train_size": 4000, "val_size": 1000,
                            "max_length": 64, "batch_size": 16, "steps": 120, "eval_every": 0, "save_every": 0}
# --quick: a seconds-long smoke run on the random tiny BERT (numbers meaningless).
MAIN_JOB_QUICK: dict[str, Any] = {"model": "tiny", "data": "vader", "train_size": 96, "val_size": 48,
                                  "max_length": 24, "batch_size": 8, "steps": 2, "eval_every": 0, "save_every": 0}

# label -> TrainConfig fields (method / optimizer / method settings); the lr and the seed are added per run.
MAIN_JOB_CONFIGS: dict[str, dict[str, Any]] = {
    "full": {"method": "full", "optim": "adamw"},
    "adamw8bit": {"method": "full", "optim": "adamw8bit"},
    "lora": {"method": "lora", "optim": "adamw"},
    "miss": {"method": "miss", "optim": "adamw"},
    "galore": {"method": "full", "optim": "galore-adamw", "gap": 50},
    "galore8bit": {"method": "full", "optim": "galore-adamw8bit", "gap": 50},
    "gradnormlorp": {"method": "gradnormlorp", "optim": "adamw", "gap": 50},
    "shira-random": {"method": "shira", "mask": "random"},
    "shira-magnitude": {"method": "shira", "mask": "magnitude"},
    "shira-gradient": {"method": "shira", "mask": "gradient"},
    "shira-snip": {"method": "shira", "mask": "snip"},
}
# The learning-rate grid of the sweep (seed 0). miss and shira-random were added after the 2026-11-23 sweep; their
# grid ran on 2026-12-03 (shira-random's 1e-2 after 5e-3 came out best at the grid's edge).
LR_GRID: dict[str, list[float]] = {
    "full": [2e-5, 5e-5, 1e-4, 2e-4, 5e-4],
    "lora": [1e-3, 2e-3, 5e-3],
    "galore": [1e-4, 3e-4, 1e-3, 3e-3],
    "gradnormlorp": [1e-4, 3e-4, 1e-3, 3e-3],
    "miss": [5e-4, 1e-3, 2e-3, 5e-3],
    "shira-random": [5e-4, 1e-3, 2e-3, 5e-3, 1e-2],
}
# The grid's choice (lowest seed-0 validation loss) in docs/results/sweeps/main_job.json; a test recomputes it.
SWEPT_LR: dict[str, float] = {"full": 2e-4, "lora": 2e-3, "galore": 1e-3, "gradnormlorp": 1e-3, "miss": 1e-3,
                               "shira-random": 5e-3}
LR_FROM = {"adamw8bit": "full", "galore8bit": "galore"}  # variants that run at their base config's lr
# The configs every reproduce experiment draws from, run at 3 seeds by the sweep's ``seeds`` grid.
MAIN_JOB_SEEDED = ("full", "adamw8bit", "lora", "galore", "gradnormlorp", "miss", "shira-random")


def main_job_lr(label: str) -> float | None:
    """The validated lr of a main-job config; None (the method's default) where no sweep chose one."""
    return SWEPT_LR.get(LR_FROM.get(label, label))


def lr_text(lr: float | None) -> str:
    return "default" if lr is None else f"{lr:g}"


def main_job_experiment(label: str, seed: int, lr: float | None) -> Experiment:
    """One main-job run: the config's fields plus seed (and lr unless the method default is meant). Its name is
    its folder, so the sweep and ``reproduce`` sharing a ``--work`` folder share the run."""
    if label not in MAIN_JOB_CONFIGS:
        raise ValueError(f"unknown main-job config {label!r}; choose from {', '.join(MAIN_JOB_CONFIGS)}")
    overrides = {**MAIN_JOB_CONFIGS[label], "seed": seed, **({} if lr is None else {"lr": lr})}
    return Experiment(f"{label}_lr{lr_text(lr)}_s{seed}", overrides, group=label,
                      tags={"lr": lr, "seed": seed, "config": label})


def main_job_runs(labels: tuple[str, ...] | list[str], seeds: tuple[int, ...] | list[int]) -> list[Experiment]:
    """Each config at its validated lr, every seed (config-major order)."""
    return [main_job_experiment(label, seed, main_job_lr(label)) for label in labels for seed in seeds]


# --- DLRT on scikit-learn's digits (reproduce dlrt, benchmarks/dlrt.py): the setup of docs/dlrt.md's benchmark
# (60 epochs, plain SGD) at the paper's τ values; seed = data split and init.
DIGITS: dict[str, Any] = {"epochs": 60, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "start_rank": 32}
DIGITS_TAUS = (0.09, 0.15, 0.3)
DIGITS_QUICK: dict[str, Any] = {**DIGITS, "epochs": 2}

# --- tiny-LLaMA pre-training from scratch on KJV (docs/lm.md (b); benchmarks/lm.py and `reproduce galore` both
# read it): the GaLore paper's Table 2 in miniature.
PRETRAIN_STEPS = 150
PRETRAIN: dict[str, Any] = {
    "task": "causal-lm", "model": "minilm", "data": "bible", "init_weights": "scratch", "arch": "llama",
    "preset": "tiny", "steps": PRETRAIN_STEPS, "batch_size": 16, "max_length": 64, "rank": 32, "gap": 50,
    "proj_scale": 0.25, "tau": 0.1, "train_size": None, "val_size": 64, "warmup_ratio": 0.1, "weight_decay": 0.0,
    "eval_every": PRETRAIN_STEPS // 5, "progress": False, "extra": {"eval_before": True}}
PRETRAIN_QUICK: dict[str, Any] = {"steps": 10, "eval_every": 2}  # benchmarks/lm.py --quick
# (label, method, optimizer, lr): benchmarks/lm.py's PRETRAIN table.
PRETRAIN_RUNS = [("full Adam", "full", "adamw", 3e-3), ("GaLore", "full", "galore-adamw", 1e-2),
                 ("8-bit GaLore", "full", "galore-adamw8bit", 1e-2), ("GradNormLoRP", "gradnormlorp", "adamw", 1e-2),
                 ("DLRT", "dlrt", "adamw", 3e-3), ("low-rank (W=BA)", "lowrank", "adamw", 3e-3)]

# --- multi-adapter fusion on the two text tasks (reproduce shira's second part, benchmarks/fusion_text.py): the
# 4-seed setup of docs/shira_miss.md (adapter lr 2e-3, at which random-mask SHiRA learns as much as LoRA).
FUSION: dict[str, Any] = {"model": "minilm", "data": "vader,bible", "methods": "shira,lora", "rank": 8, "steps": 100,
                          "batch_size": 16, "train_size": 2000, "val_size": 500, "max_length": 64, "lr": 2e-3}
FUSION_QUICK: dict[str, Any] = {**FUSION, "model": "tiny", "steps": 2, "batch_size": 8, "train_size": 96,
                                "val_size": 48, "max_length": 24}
