"""``leantrain reproduce``: argument handling (fast) and one --quick end-to-end run (slow)."""
from __future__ import annotations

import argparse
import importlib

import pytest

from leantrain.commands import reproduce
from leantrain.reproduce import EXPERIMENTS, module_name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leantrain")
    reproduce.register(p.add_subparsers(dest="command"))
    return p


def test_every_experiment_module_has_paper_and_run():
    assert EXPERIMENTS == ("dlrt", "miss", "shira", "blockwise8bit", "gradnormlorp", "galore", "dlrt-lenet5")
    for name in EXPERIMENTS:
        module = importlib.import_module(module_name(name))
        assert "arxiv.org/abs/" in module.PAPER and callable(module.run)


def test_resolve_expands_all_and_keeps_order_without_duplicates():
    assert reproduce.resolve(["all"]) == list(EXPERIMENTS)
    assert reproduce.resolve(["galore", "dlrt", "galore"]) == ["galore", "dlrt"]


def test_unknown_experiment_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"unknown experiment\(s\) nosuch .*dlrt") as info:
        reproduce.resolve(["dlrt", "nosuch"])
    assert "\n" not in str(info.value)


def test_parser_defaults_and_missing_name(capsys):
    args = parser().parse_args(["reproduce", "dlrt", "--quick", "--no-progress"])
    assert args.names == ["dlrt"] and args.quick and not args.progress
    assert str(args.out) == "docs/results" and args.func is reproduce.run
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["reproduce"])
    assert info.value.code == 2 and "NAME" in capsys.readouterr().err


def test_cli_reports_unknown_name_with_exit_2(capsys):
    from leantrain.cli import SUBCOMMANDS, main

    if "leantrain.commands.reproduce" not in SUBCOMMANDS:
        pytest.skip("reproduce is not wired into leantrain.cli yet")
    assert main(["reproduce", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leantrain: error: reproduce: unknown experiment(s) nosuch")


@pytest.mark.slow
def test_quick_dlrt_writes_table_and_plot(tmp_path):
    args = parser().parse_args(["reproduce", "dlrt", "--quick", "--no-progress", "--out", str(tmp_path / "r"),
                                "--work", str(tmp_path / "w")])
    assert reproduce.run(args) == 0
    text = (tmp_path / "r" / "dlrt" / "README.md").read_text()
    assert "| quantity | paper | ours |" in text and "98.82" in text
    assert (tmp_path / "r" / "dlrt" / "dlrt.png").stat().st_size > 1000
