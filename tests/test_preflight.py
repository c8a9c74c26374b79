"""Issue 19 item 5: the memory pre-flight (leantrain/preflight.py) and --memory-budget."""
from __future__ import annotations

import json

import pytest

from leantrain import preflight
from leantrain.config import TrainConfig
from leantrain.memory import estimate
from leantrain.preflight import MemoryBudgetError
from leantrain.units import parse_size
from leantrain.run import build_run
from leantrain.train import train

GiB = 2**30
SCRATCH = {"task": "causal-lm", "init_weights": "scratch", "method": "full", "batch_size": 1, "max_length": 256}


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * GiB), ("22G", 22 * GiB), ("500MiB", 500 * 2**20),
                                           ("8GB", 8 * 10**9), ("1e9", 10**9), ("1.5 gib", int(1.5 * GiB)),
                                           ("4096", 4096)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["eight", "8 parsecs", "-1G", ""])
def test_parse_size_refuses_in_one_line(bad: str) -> None:
    with pytest.raises(ValueError, match=f"--memory-budget {bad!r}: give a size") as err:
        parse_size(bad)
    assert "\n" not in str(err.value)


def test_prediction_is_the_estimator_plus_the_runtime() -> None:
    cfg = TrainConfig(preset="1b", dtype="bf16", optim="galore-adamw8bit", rank=512, layerwise=True,
                      activation_checkpointing=True, **SCRATCH)
    direct = estimate("llama-1b", method="full", optim="galore-adamw8bit", dtype="bf16", batch_size=1,
                      seq_len=256, activation_checkpointing=True, rank=512, layerwise=True)
    assert preflight.predicted_bytes(cfg, "cpu") == direct.total + preflight.RUNTIME_BYTES


def test_fp32_adamw_1b_is_refused_before_allocating_in_one_line() -> None:
    """The issue's example: 1B in fp32 with AdamW does not fit 8 GiB; building it would take > 5 GB first."""
    cfg = TrainConfig(preset="llama-1b", dtype="fp32", optim="adamw", memory_budget="8GiB", **SCRATCH)
    with pytest.raises(MemoryBudgetError) as err:
        build_run(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--memory-budget 8.00 GiB: this run needs an estimated")
    assert "largest term: optimizer states" in message


def test_the_suggested_change_fits_and_the_run_does_not() -> None:
    cfg = TrainConfig(preset="350m", dtype="bf16", optim="adamw", **SCRATCH)
    need = preflight.predicted_bytes(cfg, "cpu")
    with_layerwise = preflight.predicted_bytes(cfg, "cpu", layerwise=True)
    budget = (need + with_layerwise) // 2  # fits only with the first remedy
    cfg = TrainConfig(preset="350m", dtype="bf16", optim="adamw", memory_budget=str(budget), **SCRATCH)
    with pytest.raises(MemoryBudgetError, match=r"; --layerwise saves .* and fits"):
        preflight.plan(cfg, "cpu")


def test_combination_is_suggested_when_no_single_change_fits() -> None:
    cfg = TrainConfig(preset="7b", dtype="fp32", optim="adamw", memory_budget="22GiB", **SCRATCH)
    with pytest.raises(MemoryBudgetError, match="no single change fits, together .*--dtype bf16") as err:
        preflight.plan(cfg, "cpu")
    flags = str(err.value).split("together ")[1].split(" fit (")[0]
    overrides = {"--layerwise": {"layerwise": True}, "--activation-checkpointing": {"activation_checkpointing": True},
                 "--dtype bf16": {"dtype": "bf16"}, "--optim adamw8bit": {"optim": "adamw8bit"},
                 "--optim galore-adamw8bit": {"optim": "galore-adamw8bit"}}
    chosen = {k: v for flag, o in overrides.items() if flag in flags for k, v in o.items()}
    assert preflight.predicted_bytes(cfg, "cpu", **chosen) <= 22 * GiB


def test_a_run_records_the_estimate_beside_the_measured_peak(tmp_path) -> None:
    cfg = TrainConfig(preset="nano", steps=2, train_size=8, val_size=4, batch_size=2, max_length=32,
                      memory_budget="auto", progress=False, out=str(tmp_path / "run"),
                      **{k: v for k, v in SCRATCH.items() if k not in ("batch_size", "max_length")})
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["estimated_peak_bytes"] > preflight.RUNTIME_BYTES
    assert metrics["preflight_peak_bytes"] >= metrics["estimated_peak_bytes"]  # 32000-token vocab upper bound
    assert metrics["memory_budget_bytes"] > 0 and metrics["peak_rss_bytes"] > 0
