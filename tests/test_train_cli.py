"""End-to-end checks of `leantrain train`: outputs, exact resume, and one-line errors on bad input."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from leantrain.cli import main
from leantrain.report import read_jsonl


def run(args):
    return main(["train", *args])


def test_head_run_writes_every_output(tmp_path, tiny_args, capsys):
    out = tmp_path / "run"
    assert run([*tiny_args, "--method", "head", "--steps", "5", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_accuracy", "majority_baseline_accuracy", "val_loss", "steps", "wall_time_s",
                "trainable_params", "param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes"):
        assert key in metrics, key
    assert metrics["steps"] == 5
    # head only: a Linear(32, 3) trains, 32*3 + 3 parameters
    assert metrics["trainable_params"] == 32 * 3 + 3
    # AdamW keeps two fp32 moments per trainable parameter (+ a step counter per tensor)
    assert 2 * 4 * 99 <= metrics["optimizer_state_bytes"] <= 2 * 4 * 99 + 64
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert (out / "loss.png").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["method"] == "head"
    assert "validation accuracy" in capsys.readouterr().out


def test_full_finetuning_trains_everything_and_lowers_loss(tmp_path, tiny_args):
    out = tmp_path / "run"
    assert run([*tiny_args, "--method", "full", "--lr", "3e-3", "--steps", "24", "--warmup-ratio", "0",
                "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"]
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6


def test_resume_continues_exactly(tmp_path, tiny_args):
    common = [*tiny_args, "--method", "full", "--lr", "1e-3", "--steps", "8", "--save-every", "2",
              "--dropout", "0.0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run([*common, "--out", str(straight)]) == 0
    assert run([*common, "--out", str(split), "--stop-at", "4"]) == 0
    assert not (split / "metrics.json").exists()  # an interrupted run does not look complete
    assert run(["--out", str(split), "--resume", "--no-progress"]) == 0

    def losses(path):
        return [(r["step"], r["loss"]) for r in read_jsonl(path / "metrics.jsonl") if "loss" in r]

    assert losses(split) == losses(straight)  # bit-identical per-step losses on CPU
    a, b = load_file(straight / "trainable.safetensors"), load_file(split / "trainable.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_corrupt_checkpoint_is_refused_and_previous_kept(tmp_path, tiny_args, capsys):
    out = tmp_path / "run"
    assert run([*tiny_args, "--method", "head", "--steps", "6", "--save-every", "2", "--stop-at", "4",
                "--out", str(out)]) == 0
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    data = bytearray((latest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (latest / "model.safetensors").write_bytes(bytes(data))
    assert run(["--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is corrupt" in err and "step-0000002" in err
    assert (out / "checkpoints" / "step-0000002" / "manifest.json").is_file()


def test_existing_run_folder_is_not_overwritten(tmp_path, tiny_args, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run([*tiny_args, "--method", "head", "--steps", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("extra, needle", [
    (["--method", "nosuch"], "nosuch"),
    (["--optim", "nosuch"], "nosuch"),
    (["--lr", "-1"], "lr"),
    (["--data", "/nonexistent/data.csv"], "/nonexistent/data.csv"),
    (["--batch-size", "0"], "batch_size"),
])
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, tiny_args, capsys, extra, needle):
    out = tmp_path / "run"
    assert run([*tiny_args, "--steps", "1", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("leantrain: error:")
    assert not (out / "metrics.json").exists()


def test_missing_label_column_names_the_column(tmp_path, tiny_args, capsys):
    data = tmp_path / "data.csv"
    data.write_text("text,sentiment\ngood,1\nbad,0\n")
    assert run([*tiny_args, "--steps", "1", "--data", str(data), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'label'" in err and "data.csv" in err


def test_model_folder_without_weights(tmp_path, tiny_args, capsys):
    from leantrain.models import minilm_path

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, folder / name)
    args = [a for a in tiny_args if a not in ("--model", "tiny")]
    assert run([*args, "--steps", "1", "--model", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and str(folder) in err


def test_user_jsonl_data(tmp_path, tiny_args):
    rows = [{"text": f"{word} movie number {i}", "label": lab}
            for i in range(40) for word, lab in (("great", "pos"), ("awful", "neg"))]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    assert run([*tiny_args, "--method", "full", "--lr", "3e-3", "--steps", "20", "--data", str(data),
                "--out", str(out)]) == 0
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    assert json.loads((out / "metrics.json").read_text())["val_accuracy"] > 0.9
