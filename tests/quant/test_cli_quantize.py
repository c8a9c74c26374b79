"""`leantrain train --quantize nf4|int8 --method lora` end to end on the tiny model (slow: a real training run)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from leantrain.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_train_lora_on_quantized_base(tmp_path, tiny_args, kind):
    out = tmp_path / kind
    assert main(["train", *tiny_args, "--method", "lora", "--quantize", kind, "--steps", "3", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantize"] == kind
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # the run finished and evaluated
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and not any(k.endswith(".data") for k in adapter)
