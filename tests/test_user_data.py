"""A user's own data (issue 25 item 1): every row is used unless a size is asked for, repeated texts are counted,
--text-column/--label-column pick the columns, and a too-long --max-length is one line, not a traceback.

The demo keeps its subset: TrainConfig() still means 4000 training / 1000 validation sentences of vader, so
``make run`` is the same run as before.
"""
from __future__ import annotations

import json

import pytest

from leantrain.cli import main
from leantrain.config import TrainConfig
from leantrain.data import load_classification

TINY = ["--model", "tiny", "--max-length", "24", "--batch-size", "8", "--no-progress"]


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def _one_line_error(code, err, *needles):
    assert code == 2 and err.startswith("leantrain: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# --- sizes -----------------------------------------------------------------------------------------------------------
def test_size_defaults_are_the_demos_only():
    assert (TrainConfig().train_size, TrainConfig().val_size) == (4000, 1000)  # vader: `make run` unchanged
    lm = TrainConfig(task="causal-lm")
    assert (lm.data, lm.train_size, lm.val_size) == ("bible", 4000, 1000)
    user = TrainConfig(data="mine.csv")
    assert (user.train_size, user.val_size) == (None, None)
    assert TrainConfig(data="mine.csv", train_size=50).train_size == 50
    assert TrainConfig(train_size=None).train_size is None  # none = all, on the demo data too
    with pytest.raises(ValueError, match="train_size='many' must be a number"):
        TrainConfig(train_size="many")


@pytest.mark.parametrize("value, data, expected", [("auto", "vader", 4000), ("auto", "mine.csv", None),
                                                   ("none", "vader", None), ("250", "mine.csv", 250)])
def test_size_flag_spellings(value, data, expected):
    from leantrain.cli import build_parser
    from leantrain.commands.train import config_from_args

    args = build_parser().parse_args(["train", "--data", data, "--train-size", value])
    assert config_from_args(args).train_size == expected


def test_a_user_file_is_used_whole(tmp_path):
    # 6,000 distinct rows, 3 balanced classes: the stratified split holds out round(2000 * 0.2) = 400 per class
    rows = [(f"sentence number {i}", "abc"[i % 3]) for i in range(6000)]
    data = load_classification(TrainConfig(model="tiny", data=_csv(tmp_path / "big.csv", rows)))
    assert (len(data.train), len(data.val)) == (4800, 1200)
    assert data.counts() == {"train_examples": 4800, "val_examples": 1200, "train_examples_available": 4800,
                             "val_examples_available": 1200, "duplicates_dropped": 0}
    sized = load_classification(TrainConfig(model="tiny", data=str(tmp_path / "big.csv"), train_size=600))
    assert len(sized.train) == 600 and len(sized.val) == 1200


def test_repeated_texts_are_counted_and_reported(tmp_path, capsys):
    # 400 rows, 41 distinct texts (the case): 359 repeats dropped, and the run says so
    rows = [(f"text {i % 41}", "ab"[i % 41 % 2]) for i in range(400)]
    data = _csv(tmp_path / "dups.csv", rows)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", data, "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["duplicates_dropped"] == 359
    assert metrics["train_examples"] + metrics["val_examples"] == 41
    # 21 texts of class a, 20 of class b: round(21 * 0.2) + round(20 * 0.2) = 4 + 4 validation texts
    assert (metrics["train_examples"], metrics["val_examples"]) == (33, 8)
    first = printed.splitlines()[0]
    assert first.startswith("data") and "33 train / 8 validation examples" in first
    assert "all of it" in first and "359 repeated texts dropped" in first


def test_resuming_a_user_file_run_keeps_its_size(tmp_path):
    data = _csv(tmp_path / "d.csv", [(f"t{i}", "ab"[i % 2]) for i in range(80)])
    out = tmp_path / "run"
    common = [*TINY, "--data", data, "--steps", "4", "--save-every", "2"]
    assert main(["train", *common, "--train-size", "40", "--stop-at", "2", "--out", str(out)]) == 0
    # --data given again, --train-size not: its default (all rows) must not read as a changed option
    assert main(["train", "--data", data, "--resume", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_examples"] == 40


# --- columns ---------------------------------------------------------------------------------------------------------
def test_text_and_label_columns(tmp_path):
    csv_path = _csv(tmp_path / "reviews.csv", [(f"review {i}", "good" if i % 2 else "bad") for i in range(30)],
                    header="review,stars")
    data = load_classification(TrainConfig(model="tiny", data=csv_path, text_column="review",
                                           label_column="stars"))
    assert data.label_names == ["bad", "good"] and len(data.train) + len(data.val) == 30
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"text {i}", "y": i % 3, "id": i}) + "\n" for i in range(30)))
    data = load_classification(TrainConfig(model="tiny", data=str(jsonl), text_column="body", label_column="y"))
    assert data.label_names == ["0", "1", "2"]
    assert set(data.train.texts) | set(data.val.texts) == {f"text {i}" for i in range(30)}


def test_missing_column_names_file_option_and_columns(tmp_path, capsys):
    csv_path = _csv(tmp_path / "reviews.csv", [(f"r{i}", i % 2) for i in range(10)], header="review,stars")
    code = main(["train", *TINY, "--data", csv_path, "--text-column", "review", "--out", str(tmp_path / "r")])
    _one_line_error(code, capsys.readouterr().err, "reviews.csv", "'label' (--label-column)", "'review', 'stars'")
    assert not (tmp_path / "r").exists()
    code = main(["train", *TINY, "--data", csv_path, "--out", str(tmp_path / "r")])
    _one_line_error(code, capsys.readouterr().err, "'text' (--text-column) or 'label' (--label-column)")


def test_predict_reads_the_runs_text_column(tmp_path, capsys):
    rows = [(f"review {i}", "good" if i % 2 else "bad") for i in range(40)]
    data = _csv(tmp_path / "reviews.csv", rows, header="review,stars")
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", data, "--text-column", "review", "--label-column", "stars", "--steps", "2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", str(out), "--data", data, "--no-progress"]) == 0  # no --text-column: the run's
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "text,label,p_bad,p_good" and len(lines) == 41 and lines[1].startswith("review 0,")


@pytest.mark.parametrize("argv, needle", [
    (["--text-column", "review"], "not the bundled data 'vader'"),
    (["--task", "causal-lm", "--data", "corpus.jsonl", "--label-column", "y"], "not --task causal-lm"),
])
def test_columns_refused_where_there_are_none(argv, needle, tmp_path, capsys):
    code = main(["train", *TINY, *argv, "--out", str(tmp_path / "r")])
    _one_line_error(code, capsys.readouterr().err, needle)


# --- --max-length beyond the model ---------------------------------------------------------------------------------
def test_max_length_beyond_the_encoder_is_one_line(tmp_path, capsys):
    # texts longer than the tiny BERT's 128 positions: without the check the forward pass raises mid-run
    data = _csv(tmp_path / "long.csv", [(" ".join(["word"] * 300) + f" {i}", "ab"[i % 2]) for i in range(20)])
    out = tmp_path / "r"
    code = main(["train", *TINY, "--data", data, "--max-length", "100000", "--out", str(out)])
    _one_line_error(code, capsys.readouterr().err, "--max-length 100000", "128 positions", "--max-length 128")
    assert not out.exists()
    assert main(["train", *TINY, "--data", data, "--max-length", "128", "--steps", "1", "--out", str(out)]) == 0


def test_max_length_beyond_a_causal_lm_is_one_line(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of the corpus\n" for i in range(100)))
    code = main(["train", "--task", "causal-lm", "--init-weights", "scratch", "--preset", "nano", "--data",
                 str(corpus), "--max-length", "100000", "--no-progress", "--out", str(tmp_path / "r")])
    _one_line_error(code, capsys.readouterr().err, "--max-length 100000", "context of 256 tokens")  # nano: 256
    assert not (tmp_path / "r").exists()
