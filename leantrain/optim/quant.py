"""Block-wise quantization of optimizer states: dynamic (tree) and linear maps, pure PyTorch (CPU and CUDA).

Paper: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, ICLR 2022, https://arxiv.org/abs/2110.02861
(4-bit linear map without zero for the second moment: Li et al., *Memory Efficient Optimizers with 4-bit States*,
NeurIPS 2023, https://arxiv.org/abs/2309.01507).

A tensor is split into blocks of ``block_size`` consecutive elements (the last block may be shorter); each block
is divided by its absolute maximum and every value is replaced by the index of the *nearest* entry of a sorted
code table of at most 256 values in [-1, 1].

Speed: ``torch.bucketize`` over 255 midpoints is a binary search per element and costs ~25 ns/element on CPU. We
instead look the nearest code up in a 65 536-entry table indexed by the top 16 bits of the float32 value (sign,
exponent, 7 mantissa bits). When each such bucket contains at most one midpoint of the code (true for every map
built here), one comparison against that midpoint gives exactly ``bucketize(s, midpoints)`` -- round to nearest,
exact ties to the lower code -- at the cost of two table gathers and two elementwise ops. Any other sorted table
of 2..256 values (codes closer together than 2^-7 relative) is served by ``bucketize`` itself: same result,
slower (``CodeTable.fast`` says which).

Built-in maps with a cheaper closed form (``arith.faster_form``: today only the 4-bit second-moment map k/16) are
encoded by that formula instead of the lookup -- same codes, tested on every midpoint; the dynamic maps' exact
closed form is much slower than this lookup, see arith.py.

Second moments (``positive_floor=True``): a positive value never takes a code whose value is 0 -- it rounds up
to the smallest positive code instead. Adam divides by sqrt(v): a v stored as exactly 0 while m is not turns the
next update into lr*m/eps (a weight moved by 4.2 at lr 1e-3 in the regression test). Rounding up only shrinks
that update, and exact zeros still encode to 0.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from . import arith


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """Sorted float32 dynamic-tree code (bitsandbytes ``create_dynamic_map``): decades 10^-k with linear fractions.

    The unsigned variant spends the sign bit on one more fraction bit (for Adam's non-negative 2nd moment).
    """
    if not 1 <= max_exponent_bits < total_bits <= 8:
        raise ValueError(f"dynamic_map needs 1 <= max_exponent_bits < total_bits <= 8, got "
                         f"max_exponent_bits={max_exponent_bits}, total_bits={total_bits}")
    data: list[float] = []
    nsb = total_bits - 1
    extra = 2 ** (nsb - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = 2 ** (i + nsb - max_exponent_bits + (0 if signed else 1)) + 1
        data += _decade(i - max_exponent_bits + 1, n, signed)
    if extra > 0:  # bitsandbytes appends these to the top decade (its loop variable leaks): keep the same table
        data += _decade(0, extra + 1, signed)
    data += [0.0, 1.0]
    if len(data) > 2**total_bits:
        raise ValueError(f"dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
                         f"total_bits={total_bits}) has {len(data)} values > 2**{total_bits}")
    return torch.tensor(sorted(data), dtype=torch.float32)


def _decade(exponent: int, n_items: int, signed: bool) -> list[float]:
    bounds = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
    means = (bounds[:-1] + bounds[1:]) / 2.0
    vals = ((10**exponent) * means).tolist()
    return vals + ((-(10**exponent)) * means).tolist() if signed else vals


def linear_map(bits: int = 4, signed: bool = True) -> Tensor:
    """Uniform code with ``2**bits`` values: signed = linspace(-1, 1); unsigned = k/2^bits for k = 1..2^bits.

    The unsigned map deliberately has no zero: a second moment rounded to 0 turns m/sqrt(v) into m/eps and blows
    the update up (the "zero-point problem" of 4-bit optimizers, Li et al. 2023, sec. 4.1).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"linear_map bits must be in 1..8, got {bits}")
    n = 2**bits
    if signed:
        return torch.linspace(-1.0, 1.0, n, dtype=torch.float32)
    return torch.arange(1, n + 1, dtype=torch.float32) / n


class CodeTable:
    """Nearest-code quantization of scaled values with one sorted code (tables built once, cached per device)."""

    def __init__(self, code: Tensor, positive_floor: bool = False) -> None:
        code = code.detach().to("cpu", torch.float32).flatten()
        if code.numel() < 2 or code.numel() > 256:
            raise ValueError(f"a code table needs 2..256 values, got {code.numel()}")
        if not bool(torch.isfinite(code).all()):
            raise ValueError("code values must be finite")
        if not bool((code[1:] > code[:-1]).all()):
            raise ValueError("code values must be strictly increasing (sorted, no duplicates)")
        self.code, self.positive_floor = code, positive_floor
        self.mids = _midpoints(code, positive_floor)
        self.lo, self.mid, self.fast = _bucket_table(self.mids)
        self.formula = arith.faster_form(code)  # None, or a closed form measured faster than the lookup
        self._dev: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(code, lo, mid) on ``device``."""
        if device not in self._dev:
            self._dev[device] = (self.code.to(device), self.lo.to(device), self.mid.to(device))
        return self._dev[device]

    def nearest(self, s: Tensor, out: Tensor | None = None) -> Tensor:
        """Index (uint8) of the nearest code value for each element of the contiguous float32 tensor ``s``
        (written into the contiguous uint8 tensor ``out`` when given)."""
        if s.dtype != torch.float32:
            raise TypeError(f"CodeTable.nearest needs float32 values, got {s.dtype}")
        flat = s.reshape(-1)
        n = flat.numel()
        dst = torch.empty(n, dtype=torch.uint8, device=s.device) if out is None else out.view(-1)
        if self.formula is not None:
            return self.formula.nearest(flat, self.positive_floor, out=dst).view(s.shape)
        if not self.fast:
            return dst.copy_(torch.bucketize(flat, self.mids.to(s.device))).view(s.shape)
        _, lo, mid = self.on(s.device)
        h = _top16(flat, _scratch("h", n, torch.int32, s.device))
        above = torch.gt(flat, torch.index_select(mid, 0, h, out=_scratch("mid", n, torch.float32, s.device)),
                         out=_scratch("above", n, torch.bool, s.device))
        return torch.index_select(lo, 0, h, out=dst).add_(above).view(s.shape)


_SCRATCH_MAX = 1 << 20  # values; larger calls allocate (a whole-tensor quantize must not pin its size forever)
_scratch_bufs = threading.local()


def _scratch(tag: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable per-thread buffer of n values for one use site (``tag``). Eager ops on a chunk are cheap enough
    that allocating their ~1 MB outputs (page faults) cost ~40 % of the lookup; the chunk loop reuses these."""
    if n > _SCRATCH_MAX:
        return torch.empty(n, dtype=dtype, device=device)
    bufs = _scratch_bufs.__dict__.setdefault("bufs", {})
    buf = bufs.get((tag, dtype, device))
    if buf is None or buf.numel() < n:
        buf = bufs[tag, dtype, device] = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
    return buf[:n]


def _top16(flat: Tensor, out: Tensor) -> Tensor:
    """Top 16 bits (sign, exponent, 7 mantissa bits) of contiguous float32 ``flat`` as int32 table indices: on a
    little-endian CPU one strided copy of the high uint16 halves, else a shift and a mask."""
    if flat.device.type == "cpu" and sys.byteorder == "little" and flat.is_contiguous():
        return out.copy_(flat.view(torch.uint16)[1::2])
    return torch.bitwise_right_shift(flat.view(torch.int32), 16, out=out).bitwise_and_(0xFFFF)


def _midpoints(code: Tensor, positive_floor: bool) -> Tensor:
    """Decision thresholds between neighbouring codes; with ``positive_floor`` the threshold above a zero code
    is 0 itself, so every positive value lands on a positive code."""
    mids = (code[:-1] + code[1:]) / 2
    zero = (code == 0).nonzero()
    if positive_floor and zero.numel() and int(zero[0]) < mids.numel():
        mids[int(zero[0])] = 0.0
    return mids


def _bucket_table(mids: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(lo, mid, fast): per top-16-bit bucket the lower code and the one midpoint inside it (inf if none);
    ``fast`` is False when some bucket holds two or more midpoints (then ``nearest`` uses bucketize)."""
    # Every float32 whose top 16 bits equal h lies between the two floats with low bits 0x0000 and 0xFFFF.
    h = torch.arange(65536, dtype=torch.int64)
    ends = torch.stack([(h << 16), (h << 16) | 0xFFFF]).to(torch.int64)
    ends = torch.where(ends >= 2**31, ends - 2**32, ends).to(torch.int32).view(torch.float32)
    big = torch.where(h < 0x8000, 3e38, -3e38).to(torch.float32).expand_as(ends)  # inf/NaN buckets -> +-max
    ends = torch.where(torch.isfinite(ends), ends, big)
    q = torch.bucketize(ends, mids)  # count of midpoints strictly below the value
    lo, hi = q.min(0).values, q.max(0).values
    mid = torch.where(hi > lo, mids[lo.clamp_max(mids.numel() - 1)], torch.tensor(float("inf"), dtype=torch.float32))
    return lo.to(torch.uint8), mid, bool((hi - lo).max() <= 1)


_TABLES: dict[tuple, CodeTable] = {}


def code_table(code: Tensor, positive_floor: bool = False) -> CodeTable:
    """Cached :class:`CodeTable` for ``code`` (keyed by its values and ``positive_floor``)."""
    key = (*code.detach().to("cpu", torch.float32).flatten().tolist(), positive_floor)
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = CodeTable(code, positive_floor)
    return _TABLES[key]


def n_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _check_block(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def absmax_of(x: Tensor, block_size: int, signed: bool = True) -> Tensor:
    """Per-block max |x| of a flat float32 tensor (last block may be partial)."""
    n = x.numel()
    full = n // block_size * block_size
    parts = []
    if full:
        xb = x[:full].view(-1, block_size)
        if signed:  # max(max, -min): no |x| temporary, ~1.7x faster than abs + amax (10x than aminmax) on CPU;
            parts.append(torch.maximum(xb.amax(1), xb.amin(1).neg_()).abs_())  # abs_: an all-zero block gives +0
        else:  # non-negative data (Adam's v): the max is the absmax
            parts.append(xb.amax(1))
    if full < n:
        parts.append(x[full:].abs().amax().reshape(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantize_into(x: Tensor, table: CodeTable, block_size: int, codes_out: Tensor, absmax_out: Tensor,
                  signed: bool = True) -> None:
    """Quantize flat float32 ``x`` into preallocated ``codes_out`` (uint8, x.numel()) and ``absmax_out``."""
    n = x.numel()
    absmax = absmax_of(x, block_size, signed)
    absmax_out.copy_(absmax)
    div = absmax.masked_fill(absmax == 0, 1.0)  # all-zero block: 0/1 = 0 -> the code nearest 0
    full = n // block_size * block_size
    if full:
        s = torch.div(x[:full].view(-1, block_size), div[: full // block_size, None],
                      out=_scratch("s", full, torch.float32, x.device).view(-1, block_size))
        if codes_out.is_contiguous():
            table.nearest(s, out=codes_out[:full])
        else:
            codes_out[:full].copy_(table.nearest(s).view(-1))
    if full < n:
        codes_out[full:].copy_(table.nearest(x[full:] / div[-1]))


def dequantize_into(codes: Tensor, absmax: Tensor, table: CodeTable, block_size: int, out: Tensor,
                    phase: int = 0) -> Tensor:
    """Write code[codes] * absmax(block) into the flat float32 tensor ``out`` and return it. ``phase``: how many
    values of the first block precede ``codes[0]`` (a range that starts inside a block)."""
    code = table.on(codes.device)[0]
    n = codes.numel()
    torch.index_select(code, 0, _scratch("idx", n, torch.int32, codes.device).copy_(codes.reshape(-1)), out=out)
    if phase and n:  # the partial first block, then whole blocks from the next scale on
        head = min(n, block_size - phase)
        out[:head].mul_(absmax[0])
        _scale_blocks(out[head:], absmax[1:], block_size)
    else:
        _scale_blocks(out, absmax, block_size)
    return out


def _scale_blocks(out: Tensor, absmax: Tensor, block_size: int) -> None:
    """Multiply each block of ``block_size`` values of flat ``out`` (the last may be shorter) by its absmax."""
    n = out.numel()
    full = n // block_size * block_size
    if full:
        out[:full].view(-1, block_size).mul_(absmax[: full // block_size, None])
    if full < n:
        out[full:].mul_(absmax[-1])


def quantize_blockwise(x: Tensor, code: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """(uint8 codes with x's shape, float32 absmax per block): nearest code of x / absmax(block).

    Raises ValueError on non-finite input (NaN/inf would poison a whole block silently).
    """
    _check_block(block_size)
    table = code_table(code)
    flat = x.detach().reshape(-1).float().contiguous()
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks(flat.numel(), block_size), dtype=torch.float32, device=x.device)
    if flat.numel():
        quantize_into(flat, table, block_size, codes, absmax, signed=bool(code.min() < 0))
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"quantize_blockwise: input of shape {tuple(x.shape)} has non-finite values")
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, block_size: int,
                         shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_blockwise`: code[codes] * absmax of each element's block, reshaped to ``shape``."""
    _check_block(block_size)
    n = codes.numel()
    if absmax.numel() != n_blocks(n, block_size):
        raise ValueError(f"dequantize_blockwise: {n} codes need {n_blocks(n, block_size)} absmax values for "
                         f"block_size={block_size}, got {absmax.numel()}")
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    if n:
        dequantize_into(codes, absmax.float(), code_table(code), block_size, out)
    shape = tuple(codes.shape) if shape is None else tuple(shape)
    return out.view(shape).to(dtype)


def pack_4bit(codes: Tensor) -> Tensor:
    """Two 4-bit codes (values 0..15) per byte, first code in the high nibble; odd length padded with 0."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | (flat[1::2] & 0x0F)


def unpack_4bit(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_4bit`: the first ``numel`` codes as uint8."""
    if not 2 * packed.numel() - 1 <= numel <= 2 * packed.numel() and not (numel == 0 and packed.numel() == 0):
        raise ValueError(f"unpack_4bit: {packed.numel()} bytes cannot hold exactly {numel} 4-bit codes")
    out = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)
    return out[:numel]
