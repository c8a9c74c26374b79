"""``leantrain predict``: a finished run, rebuilt from its folder, reproduces its own validation accuracy exactly.

Table-driven over every registered classification method (adapters, full, DLRT, GradNormLoRP, ...) and a quantized
base, so a method whose trained state does not round-trip through ``trainable.safetensors`` fails here.
"""
from __future__ import annotations

import json

import pytest

from leantrain.cli import main
from leantrain.methods import specs
from leantrain.predict import load_trained, predict

TINY = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--steps", "3", "--lr", "1e-2", "--rank", "4"]
CASES = [[m] for m, spec in sorted(specs().items()) if "classify" in spec.tasks] + [["lora", "--quantize", "nf4"]]


@pytest.mark.parametrize("extra", CASES, ids=["+".join(c) for c in CASES])
def test_rebuilt_run_reproduces_its_validation_accuracy(extra, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", *extra, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    run = load_trained(out)
    val = run.task.data.val
    results = list(predict(run, val.texts, batch_size=16, progress=False))
    names = run.task.data.label_names
    accuracy = sum(names.index(label) == y for (label, _), y in zip(results, val.labels)) / len(val.labels)
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-12)
    assert all(abs(sum(p) - 1) < 1e-5 for _, p in results)


def test_cli_writes_csv_and_jsonl(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "lora", "--out", str(out)]) == 0
    data = tmp_path / "new.csv"
    data.write_text('review,id\n"great, really great",1\nawful,2\n')
    assert main(["predict", str(out), "--data", str(data), "--text-column", "review", "--out",
                 str(tmp_path / "p.jsonl"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["great, really great", "awful"]
    assert all(r["label"] in r["probabilities"] for r in rows)
    capsys.readouterr()
    assert main(["predict", str(out), "--data", str(data), "--text-column", "review", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("text,label,p_") and len(lines) == 3


@pytest.mark.parametrize("argv,needle", [
    (["predict", "{tmp}/nope", "--data", "-"], "is missing (is"),
    (["predict", "{run}", "--data", "{tmp}/none.csv"], "does not exist"),
    (["predict", "{run}", "--data", "{tmp}/t.csv", "--text-column", "body"], "column 'body' missing"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--method", "head", "--out", str(run)]) == 0
    (tmp_path / "t.csv").write_text("text\nhello\n")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
