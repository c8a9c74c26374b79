"""LoftQ init: Q + s·BA approximates W better than Q alone; apply_loftq on injected LoRA layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.quant import QuantLinear, apply_loftq, dequantize_tensor, loftq_init, quantize_tensor


def _weight(out=96, n_in=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a low-rank-plus-noise matrix, like a trained weight: LoftQ's SVD has structure to capture
    return torch.randn(out, 8, generator=g) @ torch.randn(8, n_in, generator=g) / 4 + 0.1 * torch.randn(
        out, n_in, generator=g)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_beats_plain_quantization(bits):
    w = _weight()
    plain = (w - dequantize_tensor(quantize_tensor(w, bits))).norm()
    errors = []
    for iters in (1, 3):
        q, a, b = loftq_init(w, r=8, bits=bits, iters=iters)
        assert a.shape == (8, 128) and b.shape == (96, 8) and q.shape == (96, 128)
        errors.append(float((w - dequantize_tensor(q) - b @ a).norm()))
    assert errors[0] < 0.9 * float(plain), (errors, float(plain))
    assert errors[1] <= errors[0] * 1.02  # more alternations do not make it worse (small float slack)


def test_loftq_scaling_and_rank_one_svd_identity():
    w = _weight()
    _, a, b = loftq_init(w, r=4, iters=1, scaling=2.0)
    # one alternation = quantize W, then best rank-4 approximation of the residual (Eckart-Young)
    residual = w - dequantize_tensor(quantize_tensor(w, 4))
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    torch.testing.assert_close(2.0 * b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-4)


def test_loftq_bad_input():
    with pytest.raises(ValueError, match="r=0"):
        loftq_init(_weight(), r=0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        loftq_init(torch.randn(4), r=1)
    with pytest.raises(ValueError, match="iters=0"):
        loftq_init(_weight(), r=2, iters=0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(128, 96)
        self.classifier = nn.Linear(96, 2)
        with torch.no_grad():
            self.lin0.weight.copy_(_weight())

    def forward(self, x):
        return self.classifier(torch.relu(self.lin0(x)))


def test_apply_loftq_on_injected_lora():
    torch.manual_seed(0)
    model = Net()
    dense_w = model.lin0.weight.detach().clone()
    adapters.inject(model, adapters.LoraConfig(r=8, alpha=16))
    report = apply_loftq(model, "default", bits=4, iters=2)
    layer = model.lin0
    assert isinstance(layer.base_layer, QuantLinear)
    assert report["lin0"]["loftq"] < 0.9 * report["lin0"]["quant"]
    p = layer.adapters["default"]
    effective = layer.base_layer.dequantize() + p.scaling * p.lora_B @ p.lora_A
    rel = float((effective - dense_w).detach().norm() / dense_w.norm())
    assert rel == pytest.approx(report["lin0"]["loftq"], rel=1e-4)
    x = torch.randn(4, 128)
    loss = model(x).sum()
    loss.backward()
    assert p.lora_A.grad is not None and p.lora_B.grad is not None


def test_apply_loftq_needs_dense_base():
    model = Net()
    from leantrain.quant import quantize

    quantize(model)
    adapters.inject(model, adapters.LoraConfig(r=4))
    with pytest.raises(TypeError, match="QuantLinear"):
        apply_loftq(model)
    with pytest.raises(ValueError, match="'other'"):
        apply_loftq(Net(), "other")
