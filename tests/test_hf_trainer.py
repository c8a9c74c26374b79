"""leantrain inside transformers.Trainer: LoRA from leantrain.adapters, AdamW8bit from leantrain.optim passed
as ``optimizers=(opt, sched)``; the loss falls, the scheduler drives our optimizer, and the adapter saved with
``leantrain.adapters.save`` reloads into a fresh model with identical outputs (examples/hf_trainer.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # Trainer needs it

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"


def load_example():
    spec = importlib.util.spec_from_file_location("example_hf_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hf")
    return load_example().run("tiny", steps=24, out=out, lr=2e-2), out


def test_trainer_with_leantrain_optimizer_learns(trained):
    result, _ = trained
    losses = result["losses"]
    assert len(losses) == 24  # logging_steps=1: one entry per optimizer step
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02
    opt = result["optimizer"]
    assert type(opt).__name__ == "AdamW8bit"
    # Trainer stepped *our* optimizer and our scheduler: states exist and the linear decay reached ~0
    assert len(opt.state) > 0
    assert opt.param_groups[0]["lr"] < 1e-4


def test_adapter_saved_by_leantrain_reloads(trained):
    from leantrain import adapters

    result, out = trained
    ex = load_example()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    net = result["model"].eval()
    fresh = ex.build_model("tiny", result["num_labels"]).eval()
    adapters.load(fresh, out / "adapter")
    fresh.classifier.load_state_dict(net.classifier.state_dict())
    enc = result["tokenizer"](result["texts"][:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        got = fresh(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.allclose(got, ref, atol=1e-6)
