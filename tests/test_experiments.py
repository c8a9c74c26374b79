"""The experiment engine (leantrain.experiments): cache by config hash, one-line failures, resume, tables, plots,
and ``leantrain compare`` on top of it with the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantrain.experiments import (
    Column,
    Experiment,
    Panel,
    base_from_cli,
    format_table,
    plot_panels,
    run_experiments,
)
from leantrain.experiments.engine import SIDECAR

CALLS: list[str] = []
INTERRUPT_AT: set[str] = set()
BASE = {"model": "tiny", "steps": 1, "progress": False}


def fake_run(cfg) -> dict:
    """A trivial in-process runner: writes metrics.json like train does; fails for lr 0.5, Ctrl-C on demand."""
    name = Path(cfg.out).name
    if name in INTERRUPT_AT:
        raise KeyboardInterrupt
    CALLS.append(name)
    if cfg.lr == 0.5:
        raise ValueError("boom\nsecond line")
    metrics = {"val_accuracy": cfg.lr + cfg.seed / 100, "trainable_params": 10}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics))
    return metrics


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    INTERRUPT_AT.clear()


def grid(lrs=(0.1, 0.2)) -> list[Experiment]:
    return [Experiment(f"lr{lr}", {"lr": lr}) for lr in lrs]


def run(tmp_path: Path, experiments: list[Experiment]):
    return run_experiments(experiments, tmp_path, base=BASE, runner=fake_run, isolate=False, progress=False)


def test_unchanged_config_is_cached_and_a_changed_one_reruns(tmp_path):
    first = run(tmp_path, grid())
    assert CALLS == ["lr0.1", "lr0.2"] and not any(r.cached for r in first)
    CALLS.clear()
    again = run(tmp_path, grid())
    assert CALLS == [] and all(r.cached for r in again)
    assert [r.metrics for r in again] == [r.metrics for r in first]
    changed = [Experiment("lr0.1", {"lr": 0.1}), Experiment("lr0.2", {"lr": 0.2, "seed": 3})]
    results = run(tmp_path, changed)
    assert CALLS == ["lr0.2"] and [r.cached for r in results] == [True, False]
    assert results[1].metrics["val_accuracy"] == pytest.approx(0.23)


def test_volatile_fields_do_not_invalidate_the_cache(tmp_path):
    run(tmp_path, grid())
    CALLS.clear()
    run_experiments(grid(), tmp_path, base={**BASE, "progress": True}, runner=fake_run, isolate=False,
                    progress=False)
    assert CALLS == []


def test_a_failed_run_is_one_line_and_the_others_complete(tmp_path, capsys):
    results = run(tmp_path, grid((0.1, 0.5, 0.2)))
    assert CALLS == ["lr0.1", "lr0.5", "lr0.2"]
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "ValueError: boom"
    assert capsys.readouterr().err.strip().splitlines() == ["lr0.5: failed: ValueError: boom"]
    assert not (tmp_path / "lr0.5" / SIDECAR).exists()
    CALLS.clear()
    run(tmp_path, grid((0.1, 0.5, 0.2)))
    assert CALLS == ["lr0.5"]  # a failed run is never cached


def test_an_interrupted_list_resumes_where_it_stopped(tmp_path):
    INTERRUPT_AT.add("lr0.2")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, grid((0.1, 0.2, 0.3)))
    assert CALLS == ["lr0.1"]
    INTERRUPT_AT.clear()
    CALLS.clear()
    results = run(tmp_path, grid((0.1, 0.2, 0.3)))
    assert CALLS == ["lr0.2", "lr0.3"] and [r.cached for r in results] == [True, False, False]


def test_a_run_without_metrics_json_is_incomplete(tmp_path):
    def no_summary(cfg):
        return {"val_accuracy": 1.0}

    [result] = run_experiments([Experiment("a")], tmp_path, base=BASE, runner=no_summary, isolate=False,
                               progress=False)
    assert not result.ok and "no metrics.json" in result.error


def test_bad_lists_are_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        run(tmp_path, [Experiment("a"), Experiment("b", {"no_such_field": 1})])
    with pytest.raises(ValueError, match="unique"):
        run(tmp_path, [Experiment("a"), Experiment("a")])
    assert CALLS == []


def test_table_shows_mean_and_std_over_seeds_and_failed_rows():
    rows = [{"label": "lora", "seed": s, "val_accuracy": a, "params": 1000} for s, a in ((0, 0.5), (1, 0.7))]
    rows += [{"label": "full", "seed": 0, "val_accuracy": 0.6, "params": 2000},
             {"label": "dlrt", "seed": 0, "error": "ValueError: boom"}]
    columns = [Column("run", "label"), Column("seeds", "seed", combine="each", sep=","),
               Column("val acc", "val_accuracy", ".4f"), Column("params", "params", ","),
               Column("x2", lambda r: 2 * r["val_accuracy"], ".1f", suffix="x")]
    lines = format_table(rows, columns).splitlines()
    assert lines[0] == "| run | seeds | val acc | params | x2 |"
    assert lines[2] == "| lora | 0,1 | 0.6000 ± 0.1414 | 1,000 | 1.2x ± 0.3x |"
    assert lines[3] == "| full | 0 | 0.6000 | 2,000 | 1.2x |"
    assert lines[4] == "| dlrt | 0 | failed: ValueError: boom |  |  |"


def test_plot_helper_writes_a_png_or_says_why_not(tmp_path, capsys, monkeypatch):
    rows = [{"label": n, "run_dir": str(tmp_path), "a": i + 1.0, "b": 2.0} for i, n in enumerate("xy")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2)))
    panels = [Panel("curve"), Panel("bar", y=("a", "b")), Panel("scatter", x=("a",), y=("b",), symlog_x=True)]
    path = plot_panels(rows, tmp_path / "p.png", panels)
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert plot_panels(rows, tmp_path / "q.png", panels) is None
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "q.png").exists()


def test_base_from_cli_parses_train_options_and_refuses_bad_ones_in_one_line():
    base = base_from_cli(["--model", "tiny", "--steps", "3", "--no-progress"])
    assert base["model"] == "tiny" and base["steps"] == 3 and base["progress"] is False
    with pytest.raises(ValueError) as info:
        base_from_cli(["--no-such-option"])
    assert "--no-such-option" in str(info.value) and "\n" not in str(info.value)


def test_compare_writes_table_json_and_plot(tmp_path, tiny_args):
    from leantrain.compare import run_compare

    out = tmp_path / "c"
    rows = run_compare(out, ["lora"], [*tiny_args, "--steps", "2"], progress=False)
    assert [r["label"] for r in rows] == ["lora"] and "error" not in rows[0]
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == ("| run | method | optimizer | lr | val acc | val loss | trainable params | optimizer state MiB | "
                        "est. peak MiB (tensors) | peak RSS MiB (process) | s/step |")
    lr = json.loads((out / "lora" / "config.json").read_text())["lr"]  # the lr the run resolved and recorded
    assert table[2].startswith(f"| lora | lora | adamw | {lr:g} | 0.") and table[-1].startswith("Baselines on the same split")
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows and rows[0]["estimated_peak_bytes"] > 0 and rows[0]["trainable_params"] > 0
    assert (out / "compare.png").stat().st_size > 1000
    stamp = (out / "lora" / "metrics.json").stat().st_mtime_ns
    assert run_compare(out, ["lora"], [*tiny_args, "--steps", "2"], progress=False) == rows  # cached: no retraining
    assert (out / "lora" / "metrics.json").stat().st_mtime_ns == stamp


def test_a_runner_can_be_a_function_in_a_script_file(tmp_path):
    from leantrain.experiments.engine import load_runner

    script = tmp_path / "bench_script.py"
    script.write_text("def run(cfg):\n    return {'steps': cfg.steps}\n")
    assert load_runner(f"{script}:run")(__import__("leantrain").TrainConfig(steps=7)) == {"steps": 7}


SCRIPT_RUNNER = '''
import json, os
from pathlib import Path

def run(cfg):
    if cfg.seed == 2:
        raise RuntimeError("seed 2 is cursed")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "metrics.json").write_text("{}")
    return {"seed": cfg.seed, "pid": os.getpid()}
'''


def test_parallel_isolated_runs_keep_list_order_and_their_own_processes(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(SCRIPT_RUNNER)
    experiments = [Experiment(f"s{seed}", {"seed": seed}) for seed in (0, 2, 3)]
    results = run_experiments(experiments, tmp_path / "out", base=BASE, runner=f"{script}:run", jobs=2,
                              progress=False)
    assert [r.ok for r in results] == [True, False, True]
    assert [r.metrics["seed"] for r in results if r.ok] == [0, 3]
    assert len({r.metrics["pid"] for r in results if r.ok} | {__import__("os").getpid()}) == 3
    assert results[1].error == "RuntimeError: seed 2 is cursed" and (tmp_path / "out" / "s2.log").is_file()


def test_a_killed_child_is_reported_by_its_signal(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text("import os, signal\n\ndef run(cfg):\n    print('50%|#####', flush=True)\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)\n")
    [result] = run_experiments([Experiment("k")], tmp_path / "out", base=BASE, runner=f"{script}:run",
                               progress=False)
    assert result.error == "killed by SIGKILL"


def test_reproduce_reports_a_failed_run_in_one_line_and_goes_on(monkeypatch, capsys, tmp_path):
    import argparse

    from leantrain.commands import reproduce
    from leantrain.reproduce import common, miss, shira

    def failing(*args, **kwargs):
        raise common.RunFailed("run 'lora r8' failed: ValueError: boom")

    monkeypatch.setattr(miss, "run", failing)
    monkeypatch.setattr(shira, "run", lambda out, work, quick, progress: Path(out) / "shira" / "README.md")
    args = argparse.Namespace(names=["miss", "shira"], out=tmp_path, work=tmp_path, quick=True, progress=False)
    assert reproduce.run(args) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["miss: run 'lora r8' failed: ValueError: boom"]
    assert "shira: wrote" in captured.out


def test_compare_offers_every_registered_classifier_method_and_the_optimizer_variants():
    from leantrain.compare import DEFAULT, entries
    from leantrain.methods import available_methods, get_method

    table = entries()
    methods = [m for m in available_methods() if "classify" in get_method(m).tasks]
    assert all(table[m] == {"method": m, "optim": "adamw"} for m in methods)
    assert table["galore8bit"] == {"method": "full", "optim": "galore-adamw8bit"}
    assert set(DEFAULT) <= set(table) and "lowrank" not in table  # lowrank trains causal LMs only
