"""benchmarks/bigmodel.py runs every recipe end to end (nano preset) and reports the pre-flight beside the RSS."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bigmodel

BIG_BUDGET = 64 * bigmodel.GIB


@pytest.mark.parametrize("recipe", list(bigmodel.RECIPES))
def test_every_recipe_runs_and_reports_estimate_and_rss(recipe: str) -> None:
    row = bigmodel.run_one("nano", recipe, steps=2, budget=BIG_BUDGET, return_freed=recipe == "adamw-bf16")
    assert "note" not in row, row
    assert math.isfinite(row["train_loss_last"])
    # nano's tensors are kilobytes: both figures are the runtime (~0.4-0.6 GiB), so they agree loosely
    assert 0.5 < row["estimate_over_measured"] < 2.0, row
    assert row["return_freed_memory"] == (recipe == "adamw-bf16")


def test_a_run_over_the_budget_is_estimated_not_run() -> None:
    row = bigmodel.run_one("7b", "adamw-fp32", steps=1, budget=8 * bigmodel.GIB)
    assert row["note"] == "estimate over budget: not run"
    assert row["estimate_gib"] > 8


def test_the_flag_reaches_the_child() -> None:
    assert "--return-freed-memory" in bigmodel.command("nano", "adamw-fp32", 1, Path("x"), return_freed=True)
    assert "--return-freed-memory" not in bigmodel.command("nano", "adamw-fp32", 1, Path("x"))


def test_largest_fitting_size_per_recipe() -> None:
    import bigmodel_plot

    lines = {"small": [1.0, 2.0, 4.0, 10.0, 30.0], "none": [25.0] * 5, "all": [1.0] * 5}
    assert bigmodel_plot.largest_fitting(lines) == {"small": "1b", "none": None, "all": "7b"}
