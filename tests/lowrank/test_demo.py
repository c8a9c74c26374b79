"""Smoke tests of ``leantrain dlrt-demo`` (one short epoch) and of the benchmark script (slow)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from leantrain.commands import dlrt_demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantrain")
    dlrt_demo.register(parser.add_subparsers(dest="command"))
    return parser


def test_demo_writes_table_json_and_plots(tmp_path, capsys):
    args = _parser().parse_args(["dlrt-demo", "--epochs", "1", "--taus", "0.2", "--start-rank", "8", "--widths", "64,48,32,10",
                                 "--out", str(tmp_path), "--no-progress"])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dense", "dlrt"]
    dense, low = rows
    assert 0 <= low["accuracy"] <= 1 and len(low["ranks"]) == 2 and all(2 <= r <= 16 for r in low["ranks"])
    assert low["params"] < dense["params"] == (64 * 48 + 48) + (48 * 32 + 32) + (32 * 10 + 10)
    assert (tmp_path / "dlrt_rank_vs_step.png").stat().st_size > 0
    assert (tmp_path / "dlrt_accuracy_vs_compression.png").stat().st_size > 0
    assert "| dlrt | 0.2 |" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["0", "-0.1", "0.1,abc"])
def test_demo_rejects_bad_tau(bad, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["dlrt-demo", "--taus", bad])
    assert repr(bad) in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_quick_json_last_line():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "dlrt.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--json"], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    rows = json.loads(out[-1])
    assert rows[0]["method"] == "dense" and {r["method"] for r in rows[1:]} == {"dlrt"}
    assert {"method", "tau", "accuracy", "params", "ranks", "sec_per_epoch"} <= set(rows[1])
