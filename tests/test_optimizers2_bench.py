"""benchmarks/optimizers2.py: which runs its phases ask for, from the rows already there (no training here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("optimizers2_bench", ROOT / "benchmarks" / "optimizers2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main_row(opt, lr, seed, val_loss, error=False):
    row = {"part": "main", "opt": opt, "lr": lr, "seed": seed, "val_loss": val_loss}
    return {**row, "error": "boom"} if error else row


def test_best_main_lr_is_the_lowest_seed0_validation_loss(bench):
    rows = [_main_row("muon", 5e-4, 0, 0.97), _main_row("muon", 2e-3, 0, 0.80),
            _main_row("muon", 2e-3, 1, 0.10),  # another seed never chooses
            _main_row("adamw", 5e-4, 0, 0.88), _main_row("adamw", 2e-3, 0, 0.88),  # tie: the lower lr
            _main_row("fira", 2e-3, 0, 0.01, error=True), _main_row("fira", 5e-4, 0, 0.90),
            {"part": "tiny", "opt": "flora", "lr": 1e-2, "seed": 0, "val_loss": 0.1}]
    assert bench.best_main_lrs(rows) == {"muon": 2e-3, "adamw": 5e-4, "fira": 5e-4}


def test_main_phases_sweep_seed0_then_add_seeds_at_the_best_lr(bench):
    sweep = bench.grid("main", [], [0, 1, 2], main_lrs=[5e-4, 2e-3])
    assert len(sweep) == 2 * len(bench.OURS)
    assert {(e.overrides["lr"], e.overrides["seed"]) for e in sweep} == {(5e-4, 0), (2e-3, 0)}
    rows = [_main_row("muon", 2e-3, 0, 0.8), _main_row("muon", 5e-4, 0, 0.9)]
    seeds = bench.grid("main-seeds", rows, [0, 1, 2])
    assert [(e.overrides["optim"], e.overrides["lr"], e.overrides["seed"]) for e in seeds] == [
        ("muon", 2e-3, 1), ("muon", 2e-3, 2)]


def test_main_peers_run_at_their_counterparts_best_lr_and_join_its_table(bench):
    rows = [_main_row("muon", 2e-3, 0, 0.8), _main_row("muon", 5e-4, 0, 0.9)]
    peers = bench.grid("main-peers", rows, [0, 1])
    assert [(e.overrides["optim"], e.overrides["lr"], e.overrides["seed"], e.overrides["extra"]["peer"])
            for e in peers] == [("muon", 2e-3, 0, "torch.optim.Muon"), ("muon", 2e-3, 1, "torch.optim.Muon")]
    def finished(opt, lr, val_loss):
        return {**_main_row(opt, lr, 0, val_loss), "name": f"{opt}-{lr}", "val_accuracy": 0.7,
                "train_loss_last": 0.7, "optimizer_state_bytes": 8, "sec_per_step": 1.0}

    done = [finished("muon", 2e-3, 0.8), finished("muon", 5e-4, 0.9), finished("torch.optim.Muon", 2e-3, 0.81)]
    table = bench.main_table(done)
    assert "torch.optim.Muon" in table and "| muon | 0.002 |" in table
