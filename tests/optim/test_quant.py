"""leantrain.optim.quant: code maps from their definition, round-trip error bounds, lookup == bucketize, bnb parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantrain.optim import quant

SIGNED_HALF_GAP = 0.0140625 / 2  # largest gap of the signed 8-bit dynamic map (top decade), spec sec. 2
UNSIGNED_HALF_GAP = 0.00703125 / 2


def _blockmax(absmax: torch.Tensor, n: int, block: int) -> torch.Tensor:
    return absmax.repeat_interleave(block)[:n]


def test_dynamic_map_properties():
    s = quant.dynamic_map(True)
    assert s.numel() == 256 and bool((s[1:] > s[:-1]).all())
    assert s[127] == 0 and s[255] == 1.0
    assert abs(float(s[0]) + 0.99296874) < 1e-7
    assert abs(float(s[s > 0].min()) - 5.5e-7) < 1e-12
    assert abs(float((s[1:] - s[:-1]).max()) - 0.0140625) < 1e-6
    u = quant.dynamic_map(False)
    assert u.numel() == 256 and u[0] == 0 and u[255] == 1.0
    assert abs(float(u[u > 0].min()) - 3.25e-7) < 1e-12
    assert abs(float((u[1:] - u[:-1]).max()) - 0.00703125) < 1e-6


def test_dynamic_map_from_definition():
    """Decade i (scale 10^(i-6)) holds the midpoints of linspace(0.1, 1, 2^i + 1) (signed, both signs)."""
    vals = [0.0, 1.0]
    for i in range(7):
        b = np.linspace(0.1, 1, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)
        vals += list(means) + list(-means)
    ref = torch.tensor(sorted(vals), dtype=torch.float64)
    assert torch.allclose(quant.dynamic_map(True).double(), ref, rtol=1e-6, atol=0)


def test_small_maps():
    d4 = quant.dynamic_map(True, max_exponent_bits=3, total_bits=4)
    assert d4.numel() == 16 and d4[-1] == 1.0 and 0.0 in d4.tolist()
    lin = quant.linear_map(4, signed=False)
    assert lin.numel() == 16 and float(lin.min()) == 1 / 16 and float(lin.max()) == 1.0  # no zero: see docstring
    assert torch.equal(quant.linear_map(4, signed=True), torch.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match="bits"):
        quant.linear_map(9)
    with pytest.raises(ValueError, match="max_exponent_bits"):
        quant.dynamic_map(True, max_exponent_bits=8, total_bits=8)


@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_bound_normal(signed):
    x = torch.randn(16384, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.abs()
    code = quant.dynamic_map(signed)
    q, absmax = quant.quantize_blockwise(x, code, 256)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.shape == (64,)
    assert torch.equal(absmax, x.view(64, 256).abs().amax(1))
    xh = quant.dequantize_blockwise(q, absmax, code, 256)
    rel = ((x - xh).abs() / _blockmax(absmax, x.numel(), 256)).max().item()
    assert rel <= (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP) * (1 + 1e-4)
    assert rel > 0.5 * (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP)  # the bound is tight, not vacuous


@pytest.mark.parametrize("code", [quant.dynamic_map(True), quant.dynamic_map(False),
                                  quant.dynamic_map(True, 3, 4), quant.linear_map(4, False),
                                  quant.linear_map(4, True)], ids=["d8s", "d8u", "d4s", "lin4u", "lin4s"])
def test_lookup_equals_bucketize(code):
    """The 16-bit lookup table is exact round-to-nearest: identical to bucketize over the midpoints."""
    g = torch.Generator().manual_seed(1)
    s = torch.cat([torch.rand(20000, generator=g) * 2 - 1, torch.randn(5000, generator=g) * 1e-4,
                   torch.randn(5000, generator=g) * 1e-7, (code[1:] + code[:-1]) / 2, code,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 2.0, -2.0])])
    ref = torch.bucketize(s, (code[1:] + code[:-1]) / 2)
    got = quant.code_table(code).nearest(s.contiguous())
    assert torch.equal(got.long(), ref)


sizes = st.sampled_from([1, 2, 255, 256, 257, 4095, 4097]) | st.integers(1, 3000)
values = st.sampled_from(["normal", "zeros", "huge", "subnormal", "mixed", "constant"])


@settings(max_examples=60, deadline=None)
@given(n=sizes, kind=values, block=st.sampled_from([2, 64, 256, 2048]), signed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_roundtrip_property(n, kind, block, signed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "zeros":
        x = torch.zeros(n)
    elif kind == "huge":
        x = x * 1e37
    elif kind == "subnormal":
        x = x * 1e-40
    elif kind == "mixed":
        x = x * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g)]
    elif kind == "constant":
        x = torch.full((n,), -3.5)
    if not signed:
        x = x.abs()
    code = quant.dynamic_map(signed)
    q, absmax = quant.quantize_blockwise(x, code, block)
    assert absmax.numel() == -(-n // block)
    xh = quant.dequantize_blockwise(q, absmax, code, block, shape=x.shape)
    bm = _blockmax(absmax, n, block).double()
    err = (x.double() - xh.double()).abs()
    bound = bm * (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP) * (1 + 1e-4) + 1e-44
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    assert bool((xh[x == 0] == 0).all())  # zeros (and all-zero blocks) come back exactly


def test_odd_shapes_and_dtypes():
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    code = quant.dynamic_map(True)
    q, absmax = quant.quantize_blockwise(x, code, 16)
    assert q.shape == (3, 5, 7) and absmax.shape == (7,)
    back = quant.dequantize_blockwise(q, absmax, code, 16, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    q0, a0 = quant.quantize_blockwise(torch.empty(0), code)
    assert q0.numel() == 0 and a0.numel() == 0


def test_bad_input():
    code = quant.dynamic_map(True)
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize_blockwise(torch.tensor([1.0, float("nan")]), code)
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_blockwise(torch.ones(4), code, 0)
    with pytest.raises(ValueError, match="absmax"):
        quant.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8), torch.ones(1), code, 256)
    with pytest.raises(ValueError, match="increasing"):
        quant.CodeTable(torch.tensor([0.0, 0.5, 0.5, 1.0]))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 256, 1001])
def test_pack_4bit_roundtrip(n):
    c = torch.randint(0, 16, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = quant.pack_4bit(c)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(quant.unpack_4bit(packed, n), c)
    if n:
        assert int(packed[0]) == int(c[0]) * 16 + (int(c[1]) if n > 1 else 0)
    with pytest.raises(ValueError, match="4-bit"):
        quant.unpack_4bit(packed, n + 2)


@pytest.mark.peer
@pytest.mark.parametrize("signed", [True, False])
def test_against_bitsandbytes(signed):
    """Same map as bnb; same absmax; codes equal except where bnb's CPU kernel is not exactly nearest."""
    F = pytest.importorskip("bitsandbytes.functional")
    ours = quant.dynamic_map(signed)
    theirs = F.create_dynamic_map(signed).float()
    assert torch.allclose(ours, theirs.sort().values, atol=1e-7, rtol=0)
    x = torch.randn(16384 + 77, generator=torch.Generator().manual_seed(3))
    x = x if signed else x.abs()
    q, absmax = quant.quantize_blockwise(x, ours, 256)
    qb, qs = F.quantize_blockwise(x, code=theirs, blocksize=256)  # runs on CPU
    assert torch.equal(absmax, qs.absmax)
    assert (q != qb).float().mean().item() < 0.005
    s = x / _blockmax(absmax, x.numel(), 256)
    err_ours = (s - ours[q.long()]).abs()
    err_bnb = (s - theirs[qb.long()]).abs()
    assert bool((err_ours <= err_bnb + 1e-7).all())  # never farther from x than bnb's choice
    back = F.dequantize_blockwise(q, qs)  # bnb decodes our codes to the same values
    assert torch.allclose(back, quant.dequantize_blockwise(q, absmax, ours, 256), atol=0, rtol=1e-6)


# ---- any sorted code table (the public contract) ---------------------------------------------------------------
@st.composite
def code_tables(draw):
    """Sorted distinct float32 tables of 2..256 values in [-1, 1]; some with values 1 ulp apart."""
    n = draw(st.integers(2, 256))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["uniform", "clustered", "tiny"]))
    vals = torch.rand(n, generator=g) * 2 - 1
    if kind == "clustered":  # neighbours closer than the 16-bit lookup can separate
        vals = 0.3 + torch.arange(n, dtype=torch.float32) * 1e-7 * torch.rand(1, generator=g).item()
    elif kind == "tiny":
        vals = vals * 1e-30
    code = torch.unique(vals.float())
    if code.numel() < 2:
        code = torch.tensor([-1.0, 1.0])
    return code


@settings(max_examples=40, deadline=None)
@given(code=code_tables(), seed=st.integers(0, 2**16))
def test_every_sorted_table_rounds_to_nearest(code, seed):
    """Any sorted table of <= 256 values is honoured: the nearest code equals bucketize over the midpoints
    (tables too dense for the 16-bit lookup fall back to a search), and quantize -> dequantize returns
    code[nearest] * absmax."""
    g = torch.Generator().manual_seed(seed)
    mids = (code[1:] + code[:-1]) / 2
    s = torch.cat([torch.rand(3000, generator=g) * 2 - 1, code, mids, torch.nextafter(mids, torch.tensor(2.0)),
                   torch.tensor([0.0, -0.0, 1.0, -1.0])])
    assert torch.equal(quant.code_table(code).nearest(s.contiguous()).long(), torch.bucketize(s, mids))
    x = torch.randn(1000, generator=g)
    q, absmax = quant.quantize_blockwise(x, code, 64)
    want = code[torch.bucketize(x / absmax.repeat_interleave(64)[:1000], mids)] * absmax.repeat_interleave(64)[:1000]
    assert torch.equal(quant.dequantize_blockwise(q, absmax, code, 64), want)


def test_dense_table_uses_the_search_path():
    dense = torch.tensor([0.0, 0.3, 0.3001, 0.3002, 1.0])  # two midpoints inside one top-16-bit bucket
    assert not quant.code_table(dense).fast and quant.code_table(quant.dynamic_map(True)).fast


@pytest.mark.parametrize("signed", [True, False])
def test_positive_floor_never_stores_a_positive_value_as_zero(signed):
    """Second-moment tables: 0 stays 0, every positive value (however small) gets the smallest positive code or
    above; values at least halfway to the next code are unaffected."""
    code = quant.dynamic_map(signed)
    table = quant.code_table(code, positive_floor=True)
    zero = int((code == 0).nonzero())
    smallest = code[zero + 1]
    s = torch.tensor([0.0, 1e-45, 1e-30, float(smallest) / 4, float(smallest) / 2, float(smallest), 0.5])
    got = table.nearest(s)
    assert int(got[0]) == zero and bool((got[1:] >= zero + 1).all())
    plain = quant.code_table(code).nearest(s)
    assert int(plain[1]) == zero  # without the floor a tiny positive value rounds to the zero code
    assert torch.equal(got[5:], plain[5:])


# ---- the eager lookup's buffers and bit tricks -----------------------------------------------------------------
def test_top16_strided_copy_equals_shift_and_mask():
    x = torch.cat([torch.randn(5000, generator=torch.Generator().manual_seed(4)),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), float("-inf"), 3.4e38, -3.4e38])])
    want = (x.view(torch.int32) >> 16) & 0xFFFF
    assert torch.equal(quant._top16(x, torch.empty(x.numel(), dtype=torch.int32)), want)
    strided = x[::2]  # not contiguous: the shift-and-mask branch
    assert torch.equal(quant._top16(strided, torch.empty(strided.numel(), dtype=torch.int32)), want[::2])


def test_results_never_alias_the_reused_buffers():
    table = quant.code_table(quant.dynamic_map(True))
    a, b = torch.rand(3000) * 2 - 1, torch.rand(3000) * 2 - 1
    first = table.nearest(a)
    keep = first.clone()
    table.nearest(b)
    assert torch.equal(first, keep)
    big = torch.rand(quant._SCRATCH_MAX + 3)  # above the cap: plain allocations, same answer
    assert torch.equal(table.nearest(big).long(), torch.bucketize(big, table.mids))


def test_signed_absmax_is_exact_and_never_negative_zero():
    x = torch.randn(4 * 256, generator=torch.Generator().manual_seed(5))
    x[:256] = -0.0
    got = quant.absmax_of(x, 256, signed=True)
    assert torch.equal(got, x.view(4, 256).abs().amax(1))
    assert got[0].view(torch.int32) == 0  # +0.0: an all-zero block decodes to +0, as before
    x[300] = float("nan")
    assert torch.isnan(quant.absmax_of(x, 256, signed=True)[1])
