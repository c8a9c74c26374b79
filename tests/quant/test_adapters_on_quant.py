"""Adapters (LoRA family, VeRA, SHiRA, MiSS) train unchanged on a QuantLinear base; merge keeps the adapter.

Model: PEFT's test MLP (Linear(10,20) -> ReLU -> Linear(20,2) head) widened to 64 so NF4 blocks are full.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.quant import QuantLinear, dequantize_model, merge, quantize


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(64, 48)
        self.lin1 = nn.Linear(48, 64)
        self.classifier = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _configs():
    from leantrain.adapters.miss import MissConfig
    from leantrain.adapters.shira import ShiraConfig

    return {
        "lora": adapters.LoraConfig(r=4, init="random"),
        "rslora": adapters.LoraConfig(r=4, use_rslora=True, init="random"),
        "dora": adapters.LoraConfig(r=4, use_dora=True, init="random"),
        "vera": adapters.VeraConfig(r=4),
        "shira": ShiraConfig(r=4, init_weights=False),
        "miss": MissConfig(r=8, init_weights=False),
    }


def _quantized_mlp(bits: int = 4) -> MLP:
    torch.manual_seed(0)
    model = MLP()
    assert quantize(model, bits=bits) == ["lin0", "lin1"]
    return model


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "vera", "shira", "miss"])
def test_adapter_trains_base_stays_frozen(kind):
    model = _quantized_mlp()
    adapters.inject(model, _configs()[kind])
    base = {n: b.clone() for n, b in model.named_buffers() if "base_layer" in n}
    assert any(n.endswith("base_layer.data") for n in base)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    opt = torch.optim.SGD(trainable, lr=0.05)
    x, y = torch.randn(32, 64), torch.randint(0, 2, (32,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():
        if "base_layer" in n:
            assert torch.equal(b, base[n]), n  # codes, scales untouched
    assert all(isinstance(m.base_layer, QuantLinear) for _, m in adapters.adapter_layers(model))
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters())


@pytest.mark.parametrize("kind", ["lora", "dora", "shira", "miss"])
def test_exact_merge_unmerge_on_quantized_base(kind):
    model = _quantized_mlp()
    adapters.inject(model, _configs()[kind])
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = model(x)
        adapters.merge(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        adapters.unmerge(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_quant_merge_dense_keeps_adapter():
    model = _quantized_mlp()
    adapters.inject(model, _configs()["lora"])
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = model(x)
        with adapters.disable(model):
            base_only = model(x)
        report = merge(model, how="dense")
        assert set(report) == {"lin0.base_layer", "lin1.base_layer"}
        assert isinstance(model.lin0.base_layer, nn.Linear)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        adapters.unmerge(model)  # the dense base still unmerges exactly to the dequantized weight
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
        with adapters.disable(model):
            torch.testing.assert_close(model(x), base_only, atol=1e-5, rtol=1e-5)


def test_quant_merge_requantize_reports_error():
    model = _quantized_mlp()
    adapters.inject(model, adapters.LoraConfig(r=4, alpha=400.0, init="random"))  # large delta survives
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = model(x)
        report = merge(model, how="requantize")
    assert isinstance(model.lin0.base_layer, QuantLinear) and model.lin0.base_layer.residual is None
    for r in report.values():
        assert 0 < r["lost"] < 0.5 and 0 < r["rel_error"] < 0.15
    with torch.no_grad():
        rel = (model(x) - before).norm() / before.norm()
    assert rel < 0.2


def test_quantize_skips_head_and_targets():
    model = _quantized_mlp()
    assert isinstance(model.classifier, nn.Linear)
    torch.manual_seed(0)
    m2 = MLP()
    assert quantize(m2, bits=8, targets=["lin1"]) == ["lin1"]
    assert isinstance(m2.lin0, nn.Linear) and isinstance(m2.lin1, QuantLinear) and m2.lin1.bits == 8
    m3 = MLP()
    assert quantize(m3, bits=4, targets="re:lin[01]") == ["lin0", "lin1"]
    assert quantize(MLP(), bits=4, targets="lin0, lin1") == ["lin0", "lin1"]  # the CLI's --targets form
    with pytest.raises(ValueError, match="'lin9'"):
        quantize(MLP(), targets=["lin0", "lin9"])
    with pytest.raises(ValueError, match="'lin9'"):
        quantize(MLP(), targets="lin0,lin9")
    with pytest.raises(ValueError, match="bits=2"):
        quantize(MLP(), bits=2)


def test_dequantize_model_round_trip():
    torch.manual_seed(0)
    dense = MLP()
    model = copy.deepcopy(dense)
    quantize(model, bits=8)
    x = torch.randn(4, 64)
    with torch.no_grad():
        q_out = model(x)
        assert dequantize_model(model) == ["lin0", "lin1"]
        assert all(type(m) is nn.Linear for m in (model.lin0, model.lin1))
        torch.testing.assert_close(model(x), q_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), dense(x), atol=2e-2, rtol=2e-2)


def test_tiny_bert_lora_on_nf4():
    from leantrain.models import build_classifier

    model = build_classifier("tiny", 3)
    names = quantize(model.encoder, bits=4, targets="all-linear")
    assert len(names) == 12  # 2 layers x (q, k, v, attn out, intermediate, output)
    adapters.inject(model, adapters.LoraConfig(r=4, target_modules=["query", "value"]))
    ids = torch.randint(0, 1000, (2, 8))
    loss = model(ids, torch.ones_like(ids)).sum()
    loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any("lora_B" in n for n in grads) and not any("base_layer" in n for n in grads)
