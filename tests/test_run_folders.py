"""Run folders (issue 25 item 7): a run that dies before its first step does not block the rerun, a folder that
cannot be resumed says to use --overwrite, --resume refuses changed run fields naming both values, announces a new
--steps, says so for a finished run, and the summary separates the training loop from wall-clock time."""
from __future__ import annotations

import json

import pytest

import leantrain.train as train_module
from leantrain.cli import main
from leantrain.config import TrainConfig

TINY = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress"]


def _one_line_error(code, err, *needles):
    assert code == 2 and err.startswith("leantrain: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_crash_before_the_first_step_does_not_block_the_rerun(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = TrainConfig(model="tiny", train_size=96, val_size=48, max_length=24, batch_size=8, steps=2,
                      progress=False, out=str(out))

    def dies_in_the_first_step(*_args, **_kwargs):
        raise MemoryError("out of memory in the first forward pass")  # e.g. a too-large batch

    monkeypatch.setattr(train_module, "train_steps", dies_in_the_first_step)
    with pytest.raises(MemoryError):
        train_module.train(cfg)
    assert (out / "config.json").is_file()  # the folder exists, no step was logged
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    assert "replacing" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def _interrupted_without_checkpoint(out, steps=3):
    """What a run killed at step ``steps`` without --save-every leaves: config, labels and logged steps."""
    out.mkdir()
    (out / "config.json").write_text(TrainConfig(model="tiny", out=str(out)).to_json())
    (out / "labels.json").write_text('["negative", "neutral", "positive"]\n')
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s + 1, "loss": 1.0}) + "\n" for s in range(steps)))


def test_a_run_without_checkpoint_names_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_without_checkpoint(out)
    code = main(["train", *TINY, "--steps", "2", "--out", str(out)])
    _one_line_error(code, capsys.readouterr().err, "stopped at step 3 without a checkpoint", "--overwrite")
    code = main(["train", "--out", str(out), "--resume", "--no-progress"])
    _one_line_error(code, capsys.readouterr().err, "no checkpoint", "step 3", "--overwrite")
    assert (out / "metrics.jsonl").is_file()  # nothing was removed
    assert main(["train", *TINY, "--steps", "2", "--overwrite", "--out", str(out)]) == 0


@pytest.fixture
def stopped_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "full", "--lr", "1e-3", "--steps", "4", "--save-every", "2",
                 "--stop-at", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flag, value, saved", [
    ("--lr", "0.01", "0.001"), ("--warmup-ratio", "0.2", "0.06"), ("--batch-size", "4", "8"),
    ("--grad-accum", "2", "1"), ("--epochs", "2", "None"),
])
def test_resume_refuses_a_changed_schedule_field(stopped_run, flag, value, saved, capsys):
    code = main(["train", "--out", str(stopped_run), "--resume", "--no-progress", flag, value])
    _one_line_error(code, capsys.readouterr().err, f"{flag} {value}", f"(the run's: {saved})", "config.json")


def test_resume_announces_a_new_step_count(stopped_run, capsys):
    assert main(["train", "--out", str(stopped_run), "--resume", "--steps", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--steps 6 replaces the run's 4" in out
    assert json.loads((stopped_run / "metrics.json").read_text())["steps"] == 6


def test_resuming_a_finished_run_says_so(stopped_run, capsys):
    assert main(["train", "--out", str(stopped_run), "--resume", "--no-progress"]) == 0
    summary = (stopped_run / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(stopped_run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already complete (4 steps); nothing to resume" in out and "0.000 s/step" not in out
    assert (stopped_run / "metrics.json").read_bytes() == summary  # not rewritten by an empty loop


def test_summary_separates_loop_and_wall_time(stopped_run, capsys):
    assert main(["train", "--out", str(stopped_run), "--resume", "--no-progress"]) == 0
    metrics = json.loads((stopped_run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["steps_this_invocation"] == 2
    assert 0 < metrics["loop_time_s"] < metrics["wall_time_s"]
    assert metrics["sec_per_step"] == pytest.approx(metrics["loop_time_s"] / 2)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("steps "))
    assert "4 (2 in this invocation); training loop" in line and "wall clock" in line
