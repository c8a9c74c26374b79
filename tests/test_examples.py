"""Smoke test of examples/plain_pytorch.py: LoRA via leantrain.adapters + AdamW8bit in a hand-written loop."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_trains_saves_and_reloads(tmp_path):
    ex = load_example("plain_pytorch")
    torch.set_num_threads(1)
    result = ex.run("tiny", steps=30, out=tmp_path)
    losses = result["losses"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.02  # the hand-written loop learns
    # LoRA went into every attention/MLP linear of the 2-layer BERT (6 per layer), not into the head
    assert len(result["targets"]) == 12 and not any("classifier" in t for t in result["targets"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    # round trip: a fresh base + the saved files computes what the trained model computes
    trained = result["model"].eval()
    fresh = ex.reload("tiny", tmp_path, num_labels=trained.classifier.out_features)
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(fresh(ids, mask), trained(ids, mask), atol=1e-6)
        # and the adapter matters: without it the outputs differ
        from leantrain import adapters

        with adapters.disable(fresh):
            assert not torch.allclose(fresh(ids, mask), trained(ids, mask), atol=1e-4)
