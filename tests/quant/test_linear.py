"""QuantLinear: forward/backward equal the dense layer built from its dequantized weight; memory; merge policy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.quant import QuantLinear, dequantize_tensor, quantize_tensor


def _layer(bits=4, n_in=96, n_out=40, bias=True, **kw) -> tuple[nn.Linear, QuantLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out, bias=bias)
    return lin, QuantLinear.from_linear(lin, bits=bits, **kw)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_equal_dense_dequantized(bits, bias):
    lin, q = _layer(bits, bias=bias)
    w = dequantize_tensor(quantize_tensor(lin.weight, bits=bits))  # independent path to the same weight
    assert torch.equal(q.dequantize(), w)
    x1 = torch.randn(3, 7, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1 = q(x1)
    y2 = F.linear(x2, w, lin.bias.detach() if bias else None)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())  # frozen base


def test_weight_close_to_original():
    lin, q = _layer(4)
    rel = (q.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.12
    lin8, q8 = _layer(8)
    assert (q8.dequantize() - lin8.weight).norm() / lin8.weight.norm() < 0.015


def test_trainable_bias_gets_gradient():
    _, q = _layer(4)
    q.bias.requires_grad_(True)
    x = torch.randn(4, 5, 96)
    q(x).sum().backward()
    torch.testing.assert_close(q.bias.grad, torch.full((40,), 20.0))


def test_backward_saves_no_dense_weight():
    _, q = _layer(4, n_in=256, n_out=256)
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.numel() >= 256 * 256 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    lin, q = _layer(4)
    x = torch.randn(3, 96).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), F.linear(x.float(), q.dequantize(), lin.bias.detach()), atol=3e-2,
                               rtol=3e-2)


def test_nbytes_counts_codes_scales_and_bias():
    _, q = _layer(4, n_in=1024, n_out=1024, double_quant=True)
    n = 1024 * 1024
    expected = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 16 * 4 + 256 * 4 + 1024 * 4
    assert q.nbytes() == expected
    assert abs(q.quant_nbytes() * 8 / n - 4.127) < 0.01
    _, q8 = _layer(8, n_in=1024, n_out=1024, double_quant=False)
    assert q8.nbytes() == n + 4 * (n // 64) + 255 * 4 + 1024 * 4


def test_exact_merge_policy_round_trip():
    _, q = _layer(4)
    w0 = q.dequantize().clone()
    delta = 1e-3 * torch.randn(40, 96)
    q.add_to_weight(delta)
    torch.testing.assert_close(q.dequantize(), w0 + delta, atol=1e-7, rtol=0)
    q.add_to_weight(-delta)
    torch.testing.assert_close(q.dequantize(), w0, atol=1e-7, rtol=0)
    assert q.nbytes() > 40 * 96 * 4  # the exact residual is dense, and nbytes says so


def test_requantize_reports_and_warns_when_delta_is_lost():
    _, q = _layer(4, merge_policy="requantize")
    w0 = q.dequantize().clone()
    small = 1e-5 * torch.randn(40, 96)
    with pytest.warns(UserWarning, match="lost"):
        q.add_to_weight(small)
    assert q.residual is None
    # a delta far below one NF4 step is rounded away: the weight comes back to the same codes
    torch.testing.assert_close(q.dequantize(), w0, atol=1e-4, rtol=0)
    _, q2 = _layer(4)
    big = 0.5 * torch.randn(40, 96)
    q2.add_to_weight(big)
    target = q2.dequantize().clone()
    report = q2.requantize()
    assert report["lost"] < 0.5 and 0 < report["rel_error"] < 0.15
    assert (q2.dequantize() - target).norm() / target.norm() == pytest.approx(report["rel_error"], rel=1e-4)


def test_to_linear_keeps_residual():
    _, q = _layer(4)
    delta = 1e-3 * torch.randn(40, 96)
    q.add_to_weight(delta)
    dense = q.to_linear()
    assert isinstance(dense, nn.Linear) and not dense.weight.requires_grad
    x = torch.randn(2, 96)
    torch.testing.assert_close(dense(x), q(x), atol=1e-6, rtol=1e-6)


def test_bad_inputs_name_values():
    lin, q = _layer(4)
    with pytest.raises(ValueError, match=r"\(3, 96\)"):
        q.add_to_weight(torch.zeros(3, 96))
    with pytest.raises(ValueError, match="95 features"):
        q(torch.randn(2, 95))
    with pytest.raises(ValueError, match="merge_policy='fast'"):
        QuantLinear.from_linear(lin, merge_policy="fast")
    with pytest.raises(ValueError, match="block_size=100"):
        QuantLinear.from_linear(lin, block_size=100)
    int_layer = nn.Linear(4, 4)
    int_layer.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="torch.int64"):
        QuantLinear.from_linear(int_layer)


def test_state_dict_round_trip():
    _, q = _layer(4)
    lin2, q2 = _layer(4, n_in=96, n_out=40)
    nn.init.normal_(lin2.weight)
    q2 = QuantLinear.from_linear(lin2)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.dequantize(), q.dequantize())
