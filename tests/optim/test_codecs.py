"""leantrain.optim.codecs: encode/decode round trips, chunked ranges == whole tensor, layouts and byte counts."""
from __future__ import annotations

import pytest
import torch

from leantrain.optim import quant
from leantrain.optim.codecs import CODECS, get_codec


def _x(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return x if signed else x.square()


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 257, 4097])
def test_roundtrip(name, signed, n):
    codec = get_codec(name, signed, block_size=64)
    x = _x(n, signed)
    enc = codec.encode(x.view(-1, 1))
    for sfx, (shape, dtype) in codec.layout(n).items():
        assert enc[sfx].shape == shape and enc[sfx].dtype == dtype
    assert codec.nbytes(n) == sum(t.numel() * t.element_size() for t in enc.values())
    back = codec.decode(enc, (n, 1))
    assert back.shape == (n, 1) and back.dtype == torch.float32
    err = (back.view(-1) - x).abs().max().item()
    absmax = x.abs().max().item()
    tol = {"fp32": 0.0, "bf16": 2**-8 * absmax, "8bit": 0.0071 * absmax, "4bit": 0.15 * absmax}[name]
    assert err <= tol + 1e-12
    if not signed and name in ("8bit", "4bit"):
        assert bool((back >= 0).all())


@pytest.mark.parametrize("name", ["8bit", "4bit", "bf16"])
def test_ranges_match_whole(name):
    """Encoding in block-aligned chunks gives exactly the whole-tensor encoding (what the optimizer relies on)."""
    n, block = 1000, 64
    codec = get_codec(name, True, block_size=block)
    x = _x(n, True, 1)
    whole = codec.encode(x)
    chunked = codec.init(n, x.device)
    for start in range(0, n, 3 * block):
        codec.encode_range(chunked, start, x[start:start + 3 * block])
    for k in whole:
        assert torch.equal(whole[k], chunked[k])
    for start in range(0, n, 2 * block):
        stop = min(n, start + 2 * block)
        assert torch.equal(codec.decode_range(whole, start, stop), codec.decode(whole, (n,))[start:stop])


def test_8bit_codec_matches_quant():
    x = _x(5000, True, 2)
    codec = get_codec("8bit", True, 256)
    enc = codec.encode(x)
    q, a = quant.quantize_blockwise(x, quant.dynamic_map(True), 256)
    assert torch.equal(enc["_codes"], q) and torch.equal(enc["_absmax"], a)


def test_4bit_uses_no_zero_for_second_moment():
    """A tiny v must not decode to 0 (m / sqrt(0) would explode): the unsigned 4-bit map has no zero."""
    codec = get_codec("4bit", False, 128)
    x = torch.full((128,), 1e-6)
    x[0] = 1.0
    assert bool((codec.decode(codec.encode(x), (128,)) > 0).all())


def test_bytes_per_value():
    n = 256 * 1000
    assert get_codec("fp32").nbytes(n) == 4 * n
    assert get_codec("bf16").nbytes(n) == 2 * n
    assert get_codec("8bit", True, 256).nbytes(n) == n + 4 * 1000
    assert get_codec("4bit", True, 256).nbytes(n) == n // 2 + 4 * 1000


def test_bad_codec():
    with pytest.raises(ValueError, match="int8"):
        get_codec("int8")
    with pytest.raises(ValueError, match="block_size"):
        get_codec("4bit", True, block_size=3)
    codec = get_codec("8bit", True, 64)
    with pytest.raises(ValueError, match="multiple of block_size"):
        codec.encode_range(codec.init(200, torch.device("cpu")), 10, torch.zeros(90))


@pytest.mark.parametrize("name", ["8bit", "4bit"])
def test_decode_range_inside_a_block_is_a_slice_of_the_whole(name):
    codec = get_codec(name, True, 64)
    x = torch.randn(200, generator=torch.Generator().manual_seed(0))
    state = codec.encode(x)
    whole = codec.decode(state, (200,))
    for start, stop in [(10, 100), (63, 64), (65, 199), (1, 2)]:
        assert torch.equal(codec.decode_range(state, start, stop), whole[start:stop])
