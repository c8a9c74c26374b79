"""save_quantized -> load_quantized into a fresh skeleton reproduces the quantized model exactly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from leantrain.models import build_classifier
from leantrain.quant import QuantLinear, load_quantized, quantize, save_quantized


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (2, 9), generator=g)


@pytest.mark.parametrize("bits,double_quant", [(4, True), (8, False)])
def test_round_trip_into_fresh_skeleton(tmp_path, ids, bits, double_quant):
    model = build_classifier("tiny", 3, seed=0).eval()
    quantize(model, bits=bits, double_quant=double_quant)
    with torch.no_grad():
        model.encoder.encoder.layer[0].attention.self.query.add_to_weight(1e-3 * torch.ones(32, 32))
        expected = model(ids, torch.ones_like(ids))
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    assert len(meta["layers"]) == 12 and all(v["bits"] == bits for v in meta["layers"].values())
    stored = load_file(str(tmp_path / "quantized.safetensors"))
    key = "encoder.encoder.layer.0.attention.self.query"
    assert stored[f"{key}.data"].dtype == torch.uint8 and f"{key}.code" in stored and f"{key}.residual" in stored
    skeleton = build_classifier("tiny", 3, seed=123).eval()  # different random weights: nothing reused
    load_quantized(skeleton, tmp_path)
    assert sum(isinstance(m, QuantLinear) for m in skeleton.modules()) == 12
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids, torch.ones_like(ids)), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for m in skeleton.modules() if isinstance(m, QuantLinear)
                   for p in m.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant_config.json", "quantized.safetensors"]


def test_load_rejects_mismatch(tmp_path):
    model = build_classifier("tiny", 3)
    quantize(model, bits=4)
    save_quantized(model, tmp_path)
    path = tmp_path / "quantized.safetensors"
    tensors = load_file(str(path))
    key = "encoder.encoder.layer.1.output.dense.data"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="layer.1.output.dense.data"):
        load_quantized(build_classifier("tiny", 3), tmp_path)
    with pytest.raises(FileNotFoundError, match="quant_config.json"):
        load_quantized(build_classifier("tiny", 3), tmp_path / "nowhere")


def test_load_rejects_wrong_skeleton(tmp_path):
    model = build_classifier("tiny", 3)
    quantize(model, bits=4)
    save_quantized(model, tmp_path)
    skeleton = build_classifier("tiny", 3)
    skeleton.classifier = torch.nn.Linear(32, 3, bias=False)  # the file has classifier.bias
    with pytest.raises(KeyError, match="classifier.bias"):
        load_quantized(skeleton, tmp_path)
    with pytest.raises(ValueError, match="size mismatch for classifier.weight"):
        load_quantized(build_classifier("tiny", 5), tmp_path)  # head shape differs: torch names the key
