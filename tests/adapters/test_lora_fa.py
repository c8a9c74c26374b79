"""LoRA-FA (``--method lora-fa``): A stays at its random init, B trains, files are PEFT LoRA files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leantrain.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lorafa") / "run"
    args = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
            "--no-progress", "--method", "lora-fa", "--rank", "4", "--steps", "6", "--lr", "1e-2"]
    assert main(["train", *args, "--out", str(out)]) == 0
    return out


def test_a_is_frozen_b_trains_and_the_files_are_lora(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    a = {k: v for k, v in tensors.items() if ".lora_A." in k}
    b = {k: v for k, v in tensors.items() if ".lora_B." in k}
    assert a and len(a) == len(b)
    assert all(v.abs().sum() > 0 for v in b.values()), "B starts at zero and must have trained"
    # only B (and the head) train: the trainable count is the B entries plus the head's 32*3 + 3
    assert metrics["trainable_params"] == sum(v.numel() for v in b.values()) + 32 * 3 + 3


def test_a_equals_its_seeded_init(run_dir, tmp_path):
    """A zero-step run with the same seed builds the same A: training never touched it."""
    out = tmp_path / "init"
    args = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
            "--no-progress", "--method", "lora", "--rank", "4", "--steps", "1", "--lr", "1e-30"]
    assert main(["train", *args, "--out", str(out)]) == 0
    trained = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    fresh = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in (k for k in trained if ".lora_A." in k):
        assert torch.equal(trained[key], fresh[key]), key


def test_merge_folds_the_adapter_in(run_dir, tmp_path):
    """The saved files are ordinary LoRA files: ``leantrain merge`` folds them in as for LoRA."""
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert any((tmp_path / "merged").iterdir())


@pytest.mark.parametrize("extra, needle", [(["--init", "pissa"], "LoRA-FA freezes a random A"),
                                           (["--lora-plus-ratio", "16"], "does not train A")])
def test_options_lora_fa_cannot_honour_are_refused(extra, needle, tmp_path, capsys):
    args = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
            "--no-progress", "--method", "lora-fa", "--steps", "1", *extra]
    assert main(["train", *args, "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
