"""Smoke run of benchmarks/quantized.py (slow: loads MiniLM and times layers; run with -m slow)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_quick_benchmark_runs(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quantized.py"
    spec = importlib.util.spec_from_file_location("bench_quantized", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "q.json"
    assert module.main(["--quick", "--skip-model", "--json", str(out), "--plot", str(tmp_path / "q.png")]) == 0
    result = json.loads(out.read_text())
    nf4 = next(r for r in result["bytes"] if r["variant"] == "NF4 + DQ")
    assert 4.1 < nf4["bits_per_weight"] < 4.2 and nf4["matrices_vs_fp32"] < 0.135
    assert all(r["loftq_err_mean"] < r["quant_err_mean"] for r in result["loftq"])
    assert (tmp_path / "q.png").stat().st_size > 0
