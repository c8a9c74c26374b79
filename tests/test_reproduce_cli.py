"""``leantrain reproduce``: argument handling (fast) and one --quick end-to-end run (slow)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from pathlib import Path

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
    assert "| quantity | paper | ours | gap | reason |" in text and "98.82" in text
    assert (tmp_path / "r" / "dlrt" / "dlrt.png").stat().st_size > 1000


# --- one definition per experiment: each reproduce experiment and its benchmark plan the very same runs --------------

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB_EXPERIMENTS = ("blockwise8bit", "galore", "gradnormlorp", "miss", "shira")


class Planned(Exception):
    """Raised by the capturing stand-in for the training call: the plan is known, nothing is trained."""


def script(name: str):
    """A benchmark script as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def capture_engine(monkeypatch, module) -> list:
    """Replace ``module.run_experiments`` by one that records (experiment name, resolved config + threads per run)
    and stops."""
    from leantrain.experiments.engine import resolve

    seen: list = []

    def planned(experiments, out, *, base=None, env=None, **kwargs):
        for exp in experiments:
            config = json.loads(resolve(exp, base or {}, Path("/plan")).to_json())
            config = {k: v for k, v in config.items() if k not in ("out", "progress")}
            seen.append((exp.name, {**config, "threads": (env or {}).get("OMP_NUM_THREADS")}))  # threads: numerics
        raise Planned

    monkeypatch.setattr(module, "run_experiments", planned)
    return seen


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("name", MAIN_JOB_EXPERIMENTS)
def test_reproduce_runs_are_the_main_job_sweeps_runs(name, quick, monkeypatch, tmp_path):
    from leantrain.reproduce import common

    sweep = script("main_job_sweep")
    planned_sweep = capture_engine(monkeypatch, sweep)
    with pytest.raises(Planned):
        sweep.main(["seeds", "--out", str(tmp_path / "sweep"), *(["--quick", "--seeds", "0"] if quick else [])])
    planned_reproduce = capture_engine(monkeypatch, common)
    with pytest.raises(Planned):
        importlib.import_module(module_name(name)).run(tmp_path / "out", tmp_path / "work", quick=quick,
                                                       progress=False)
    by_name = dict(planned_sweep)
    module = importlib.import_module(module_name(name))
    assert len(planned_reproduce) == len(module.RUNS) * (1 if quick else 3)
    for run_name, config in planned_reproduce:
        sweep_name = run_name.removeprefix("quick-") if quick else run_name
        assert sweep_name in by_name, f"{name}: {run_name} is not a run of main_job_sweep.py seeds"
        assert config == by_name[sweep_name], f"{name}: {run_name} differs from the sweep's run"
    if not quick:  # the validated settings, not a smoke run
        assert {c["steps"] for _, c in planned_reproduce} == {120}
        assert {c["train_size"] for _, c in planned_reproduce} == {4000}
        assert {c["seed"] for _, c in planned_reproduce} == {0, 1, 2}


def test_recorded_learning_rates_are_the_sweeps_choice():
    """SWEPT_LR is what the lr grid chose (lowest seed-0 val loss) in the committed sweep results."""
    from leantrain.experiments.definitions import SWEPT_LR

    sweep = script("main_job_sweep")
    rows = json.loads((ROOT / "docs" / "results" / "sweeps" / "main_job.json").read_text())
    assert sweep.best_lrs(rows) == SWEPT_LR


def test_reproduce_dlrt_and_benchmark_dlrt_train_the_same_runs(monkeypatch, tmp_path, capsys):
    from leantrain.reproduce import dlrt

    calls = []

    def planned(taus, seeds, settings, progress=None, repeats=1):
        calls.append((tuple(taus), tuple(seeds), dict(settings), repeats))
        raise Planned

    monkeypatch.setattr(dlrt, "digits_runs", planned)
    with pytest.raises(Planned):
        dlrt.run(tmp_path, tmp_path, quick=False, progress=False)
    bench = script("dlrt")
    monkeypatch.setattr(bench, "digits_runs", planned)
    with pytest.raises(Planned):
        bench.main([])
    assert calls[0] == calls[1]
    taus, seeds, settings, _ = calls[0]
    assert taus == (0.09, 0.15, 0.3) and seeds == (0, 1, 2) and settings["epochs"] == 60


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_reproduce_galore_pretraining_is_benchmark_lm_pretraining(quick, monkeypatch, tmp_path):
    """The tiny-LLaMA runs of `reproduce galore` are benchmarks/lm.py's pre-training runs (seed 0; lm.py runs one
    seed) for the same labels, at the same steps."""
    from leantrain.reproduce import galore_pretrain

    lm = script("lm")
    planned_lm = capture_engine(monkeypatch, lm)
    args = argparse.Namespace(threads=1, out=str(tmp_path / "lm"), preset="tiny", quick=quick)
    with pytest.raises(Planned):
        lm.run_part("pretrain", 10 if quick else 150, args)
    planned_reproduce = capture_engine(monkeypatch, galore_pretrain)
    with pytest.raises(Planned):
        galore_pretrain.extra(tmp_path / "work", quick, False)
    lm_by_method = {(c["method"], c["optim"]): c for _, c in planned_lm}
    seed0 = [c for _, c in planned_reproduce if c["seed"] == 0]
    assert len(seed0) == len(galore_pretrain.LABELS) and len(planned_reproduce) == len(seed0) * (1 if quick else 3)
    for config in seed0:
        assert config == lm_by_method[(config["method"], config["optim"])]


def test_pool_seeds_gives_mean_and_sample_sd_over_seeds():
    from leantrain.reproduce.dlrt import pool_seeds

    def row(acc, sec, params, ranks):
        return {"method": "dlrt", "tau": 0.1, "accuracy": acc, "sec_per_epoch": sec, "params": params,
                "compression": 1 - params / 100, "ranks": ranks}

    [pooled] = pool_seeds([[row(0.9, 1.0, 10, [3])], [row(0.8, 3.0, 20, [4])]])
    assert pooled["accuracy"] == pytest.approx(0.85) and pooled["accuracy_sd"] == pytest.approx(0.5**0.5 / 10)
    assert pooled["sec_per_epoch"] == pytest.approx(2.0) and pooled["params"] == 15
    assert pooled["compression"] == pytest.approx(0.85) and pooled["ranks_per_seed"] == [[3], [4]]
    assert pooled["seeds"] == 2 and pooled["accuracy_per_seed"] == [0.9, 0.8]


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_reproduce_shira_fusion_is_benchmark_fusion_text(quick, monkeypatch, tmp_path):
    """`reproduce shira`'s fusion part trains what benchmarks/fusion_text.py trains with no options (quick: the
    same smoke settings passed as options)."""
    from leantrain.experiments.definitions import FUSION, FUSION_QUICK
    from leantrain.reproduce import shira_fusion

    calls = []

    def planned(cfg, data, labels):
        calls.append((json.loads(cfg.to_json()) | {"progress": None}, list(data), list(labels)))
        raise Planned

    monkeypatch.setattr(shira_fusion, "run_seed", planned)
    with pytest.raises(Planned):
        shira_fusion.extra(tmp_path, quick, False)
    bench = script("fusion_text")
    monkeypatch.setattr(bench, "run_seed", planned)
    settings = FUSION_QUICK if quick else FUSION
    options = [] if not quick else [f"--{k.replace('_', '-')}={v}" for k, v in FUSION_QUICK.items()
                                    if FUSION.get(k) != v]
    with pytest.raises(Planned):
        bench.main([*options, "--no-progress", "--plot", ""])
    assert calls[0] == calls[1]
    config, data, labels = calls[0]
    assert data == settings["data"].split(",") and labels == ["shira", "lora"] and config["seed"] == 0
    assert (config["steps"], config["lr"]) == ((2, 2e-3) if quick else (100, 2e-3))
