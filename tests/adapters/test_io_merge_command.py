"""Training-method objects (leantrain.adapters.methods) and ``leantrain merge``, on the tiny BERT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from leantrain import adapters
from leantrain.adapters.methods import LORA, PISSA, VERA, parse_targets
from leantrain.commands import merge as merge_cmd
from leantrain.config import TrainConfig
from leantrain.methods import get_method
from leantrain.models import build_classifier


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 12), generator=gen)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all-linear", "all-linear"),
        ("query, value", ["query", "value"]),
        (r"re:.*\.query", r"re:.*\.query"),
    ],
)
def test_parse_targets(text, expected):
    assert parse_targets(text) == expected


def test_registry_resolves_every_adapter_method():
    for name in ("lora", "rslora", "dora", "pissa", "vera"):
        method = get_method(name)
        assert method.name == name and method.default_lr > 0


def test_lora_plus_groups_from_train_config():
    model = build_classifier("tiny", 3)
    cfg = TrainConfig(model="tiny", method="dora", rank=4, targets="query,value", lora_plus_ratio=16, lr=1e-3)
    groups = get_method("dora").apply(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora_A", "lora_B", "lora_B_1d"}
    assert "lr" not in by_name["lora_A"] and by_name["lora_B"]["lr"] == pytest.approx(16e-3)
    assert all(p.ndim == 1 for p in by_name["lora_B_1d"]["params"])
    assert len(by_name["lora_A"]["params"]) == 4  # 2 layers x (query, value)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}


@pytest.mark.parametrize("method", [LORA, PISSA, VERA], ids=lambda m: m.name)
def test_merge_command_writes_equivalent_plain_model(method, tmp_path):
    """``leantrain merge`` (an alias of ``leantrain export``) on a finished run: the merged state dict loads into
    the plain classifier and gives the trained model's logits."""
    from leantrain.cli import main
    from leantrain.predict import load_trained

    run_dir, out = tmp_path / "run", tmp_path / "merged"
    assert main(["train", "--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24",
                 "--batch-size", "8", "--no-progress", "--steps", "3", "--lr", "1e-2", "--rank", "4",
                 "--method", method.name, "--out", str(run_dir)]) == 0
    args = argparse.Namespace(run=str(run_dir), out=str(out), format="safetensors", overwrite=False)
    assert merge_cmd.run(args) == 0
    labels = json.loads((out / "labels.json").read_text())
    assert labels == json.loads((run_dir / "labels.json").read_text())
    trained = load_trained(run_dir).task.model.eval()
    plain = build_classifier("tiny", len(labels)).eval()
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    torch.testing.assert_close(plain(*batch()), trained(*batch()), atol=1e-5, rtol=1e-5)


def test_merge_command_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
        merge_cmd.merge_run(tmp_path, tmp_path / "out")


def test_merge_command_parser():
    parser = argparse.ArgumentParser()
    merge_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["merge", "runs/x", "--out", "merged"])
    assert args.func is merge_cmd.run and args.run == "runs/x" and args.out == "merged"


def test_quantized_base_adapter():
    """Contract: inject wraps leantrain.quant.QuantLinear; merge/unmerge go through add_to_weight."""
    quant = pytest.importorskip("leantrain.quant")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    quant.quantize(model, bits=4, targets=["0"])
    x = torch.randn(5, 64)
    y0 = model(x)
    adapters.inject(model, adapters.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    assert type(model[0].base_layer).__name__ == "QuantLinear"
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=0)
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_()
    y = model(x)
    adapters.merge(model)
    torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
    adapters.unmerge(model)
    torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
