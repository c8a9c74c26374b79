"""Round-trip error bounds of block-wise NF4 / int8 quantization, over shapes including odd sizes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantrain.quant import dequantize_tensor, quantize_tensor
from leantrain.quant.functional import pack_4bit, unpack_4bit

# Half the largest gap of each code book. NF4's largest gap is between -1 and the next negative value
# -0.6961928 (QLoRA Appendix E; the negative half has one value fewer); int8's gap is 1/127.
NF4_HALF_GAP = (1 - 0.6961928009986877) / 2
INT8_HALF_GAP = 0.5 / 127
DQ_REL = 0.0070313  # half the largest gap of the signed dynamic map (blockwise8bit.md §2)

shapes = st.tuples(st.integers(1, 70), st.integers(1, 130))
blocks = st.sampled_from([2, 16, 64, 256])


def _blockwise_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    flat = x.reshape(-1)
    return torch.stack([flat[i:i + block].abs().max() for i in range(0, flat.numel(), block)])


def _per_element(values: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    return values.repeat_interleave(block)[:numel]


@settings(max_examples=40, deadline=None)
@given(shape=shapes, block=blocks, bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_error_bound_without_double_quant(shape, block, bits, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = quantize_tensor(x, bits=bits, block_size=block, double_quant=False)
    y = dequantize_tensor(q)
    assert y.shape == x.shape and y.dtype == torch.float32
    absmax = _per_element(_blockwise_absmax(x, block), block, x.numel())
    half_gap = NF4_HALF_GAP if bits == 4 else INT8_HALF_GAP
    err = (x - y).abs().reshape(-1)
    assert torch.all(err <= absmax * half_gap * (1 + 1e-5) + 1e-12), float((err / absmax).max())
    # the largest |x| of each block is represented exactly (code ±1 times its absmax)
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), block):
        j = i + int(flat[i:i + block].abs().argmax())
        assert abs(float(y.reshape(-1)[j] - flat[j])) <= 1e-6 * abs(float(flat[j])) + 1e-12


@settings(max_examples=30, deadline=None)
@given(shape=shapes, block=st.sampled_from([16, 64]), bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_error_bound_with_double_quant(shape, block, bits, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    q = quantize_tensor(x, bits=bits, block_size=block, double_quant=True)
    assert q.absmax is None and q.absmax_idx.dtype == torch.uint8
    absmax = _blockwise_absmax(x, block)
    # absmax constants: 8-bit dynamic codes of (absmax - mean) in blocks of 256
    dev = (absmax - absmax.mean()).abs()
    scale = torch.stack([dev[i:i + 256].max() for i in range(0, dev.numel(), 256)]).repeat_interleave(256)
    absmax_err = DQ_REL * scale[: absmax.numel()] + 1e-6
    bound = absmax * (NF4_HALF_GAP if bits == 4 else INT8_HALF_GAP) + absmax_err
    err = (x - dequantize_tensor(q)).abs().reshape(-1)
    assert torch.all(err <= _per_element(bound, block, x.numel()) * (1 + 1e-5))


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_and_exact_values(bits):
    z = torch.zeros(3, 65)
    assert torch.equal(dequantize_tensor(quantize_tensor(z, bits=bits)), z)
    # values on the code grid (absmax 2 per block) survive unchanged
    q = quantize_tensor(torch.randn(4, 64), bits=bits, double_quant=False)
    grid = dequantize_tensor(q)
    torch.testing.assert_close(dequantize_tensor(quantize_tensor(grid, bits=bits, double_quant=False)), grid,
                               atol=1e-6, rtol=0)


def test_typical_relative_error():
    # NF4 on N(0,1) weights: relative Frobenius error ≈ 0.1 (int8 ≈ 0.01); catches a broken code book.
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    nf4 = float((dequantize_tensor(quantize_tensor(x, 4)) - x).norm() / x.norm())
    int8 = float((dequantize_tensor(quantize_tensor(x, 8)) - x).norm() / x.norm())
    assert 0.07 < nf4 < 0.12 and 0.003 < int8 < 0.015, (nf4, int8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    x = torch.randn(8, 64).to(dtype)
    y = dequantize_tensor(quantize_tensor(x, 4), dtype)
    assert y.dtype == dtype
    ref = dequantize_tensor(quantize_tensor(x.float(), 4))
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)


def test_pack_unpack_round_trip_and_order():
    idx = torch.randint(0, 16, (130,), dtype=torch.uint8)
    packed = pack_4bit(idx)
    assert packed.shape == (65,) and int(packed[0]) == int(idx[0]) * 16 + int(idx[1])
    assert torch.equal(unpack_4bit(packed), idx)


def test_bytes_per_weight():
    x = torch.randn(1024, 1024)
    nf4 = quantize_tensor(x, 4, double_quant=True).nbytes() * 8 / x.numel()
    nf4_plain = quantize_tensor(x, 4, double_quant=False).nbytes() * 8 / x.numel()
    int8 = quantize_tensor(x, 8, double_quant=False).nbytes() * 8 / x.numel()
    assert abs(nf4 - (4 + 8 / 64 + 32 / (64 * 256))) < 0.01  # QLoRA: 4.127 bits
    assert abs(nf4_plain - (4 + 32 / 64)) < 0.01
    assert abs(int8 - (8 + 32 / 64)) < 0.01


@pytest.mark.parametrize("bad", [0, 3, 48, 8192, -64])
def test_bad_block_size_names_value(bad):
    with pytest.raises(ValueError, match=f"block_size={bad}"):
        quantize_tensor(torch.randn(4, 64), 4, block_size=bad)


def test_bad_inputs_name_value():
    with pytest.raises(TypeError, match="64.0"):
        quantize_tensor(torch.randn(4, 64), 4, block_size=64.0)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_tensor(torch.randn(4, 64), 3)
    with pytest.raises(TypeError, match="torch.int32"):
        quantize_tensor(torch.ones(4, 64, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="torch.complex64"):
        quantize_tensor(torch.ones(4, 64, dtype=torch.complex64), 4)
    with pytest.raises(ValueError, match=r"\(0, 5\)"):
        quantize_tensor(torch.ones(0, 5), 4)
    with pytest.raises(ValueError, match=r"\(2, 3\) with NaN"):
        quantize_tensor(torch.tensor([[1.0, 2.0, 3.0], [0.0, float("nan"), 1.0]]), 4)
