"""Estimator = trainer (issue 19 item 6), slow: for the exact flags of a run, ``leantrain memory``'s tensor peak
and process estimate are within +-10 % of the profiled tensor peak and of the peak RSS of the same run (with
``--return-freed-memory``, so RSS follows the tensors). Each row is two child processes of
benchmarks/estimator_matrix.py (profiled, then plain); LLaMA-350m, ~3 min per row on one thread. The 1b rows and
the full table: ``benchmarks/estimator_matrix.py --sizes 350m,1b --return-freed-memory`` (docs/memory.md)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _matrix():
    spec = importlib.util.spec_from_file_location("estimator_matrix", ROOT / "benchmarks" / "estimator_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", [r for r in _matrix().configs(["350m"]) if r["dtype"] == "bf16" or r["layerwise"]],
                         ids=lambda r: f"{r['dtype']}-lw{int(r['layerwise'])}-ckpt{int(r['activation_checkpointing'])}")
def test_estimate_matches_the_run(row: dict, tmp_path: Path) -> None:
    result = _matrix().run_child(row, "galore-adamw8bit", str(tmp_path / "run"), return_freed=True)
    assert "note" not in result, result.get("note")
    assert 0.9 <= result["tensor_ratio"] <= 1.1, result
    assert 0.9 <= result["rss_ratio"] <= 1.1, result
