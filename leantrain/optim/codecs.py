"""State codecs: how one fp32 optimizer-state tensor (a moment) is stored -- fp32, bf16, 8-bit or 4-bit block-wise.

Paper: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, https://arxiv.org/abs/2110.02861.

A codec is independent of the update rule: the optimizer core decodes a range of a moment to fp32, runs its
update on that range, and encodes it back. Any Adam-like rule (ours, GaLore's low-rank moments) can use any codec.
Encoded state is a dict of plain tensors (stored in the optimizer state under ``<moment><suffix>``), so
``state_dict()`` round-trips through safetensors or ``torch.load(weights_only=True)``.

* ``fp32``  -- the moment itself (suffix ``""``).
* ``bf16``  -- the moment in bfloat16 (suffix ``""``), 2 bytes/value.
* ``8bit``  -- dynamic-tree map, signed for the 1st moment, unsigned for the 2nd: ``_codes`` (uint8, one per value)
  and ``_absmax`` (fp32, one per block); 1 + 4/block bytes/value. Unsigned (second-moment) codecs never store a
  positive value as the zero code (see quant.py: a v decoded as 0 under a nonzero m makes Adam's step lr*m/eps).
* ``4bit``  -- signed 4-bit dynamic map (1st moment) / linear map without zero (2nd moment), two codes per byte.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import quant

CODECS = ("fp32", "bf16", "8bit", "4bit")


class Codec:
    """Base class. ``encode``/``decode`` work on whole tensors; ``*_range`` on flat slices for chunked updates."""

    name = "fp32"

    def init(self, numel: int, device: torch.device, offset: int = 0) -> dict[str, Tensor]:
        """Encoded all-zeros state of ``numel`` values (``offset``: where they start in the global tensor, for a
        shard of an FSDP2 parameter; only block-wise codecs care)."""
        return self.encode(torch.zeros(numel, dtype=torch.float32, device=device))

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.detach().reshape(-1).float().clone()}

    def decode(self, state: dict[str, Tensor], shape: Sequence[int]) -> Tensor:
        n = _numel(shape)
        return self.decode_range(state, 0, n).reshape(tuple(shape)).clone()

    def decode_range(self, state: dict[str, Tensor], start: int, stop: int, offset: int = 0) -> Tensor:
        """fp32 values [start, stop) of the flat moment (may be a view into the state for fp32)."""
        return state[""][start:stop]

    def encode_range(self, state: dict[str, Tensor], start: int, x: Tensor, offset: int = 0) -> None:
        """Store flat fp32 ``x`` as values [start, start + len(x)); ``offset + start`` is a multiple of the block
        size and every block the range touches lies inside it (a block-wise codec computes the blocks' absmax)."""
        dst = state[""][start:start + x.numel()]
        if dst.data_ptr() != x.data_ptr():
            dst.copy_(x)

    def encode_piece(self, state: dict[str, Tensor], start: int, x: Tensor, absmax: float, offset: int = 0) -> None:
        """Store values that lie in one block shared with another FSDP2 shard; ``absmax`` is that whole block's
        (only block-wise codecs use it)."""
        self.encode_range(state, start, x, offset)

    def layout(self, numel: int, offset: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected (shape, dtype) of each encoded tensor, for checking a loaded state_dict."""
        return {"": ((numel,), torch.float32)}

    def nbytes(self, numel: int) -> int:
        return sum(_numel(s) * torch.empty((), dtype=d).element_size() for s, d in self.layout(numel).values())


class BF16Codec(Codec):
    name = "bf16"

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.detach().reshape(-1).to(torch.bfloat16)}

    def decode_range(self, state: dict[str, Tensor], start: int, stop: int, offset: int = 0) -> Tensor:
        return state[""][start:stop].float()

    def encode_range(self, state: dict[str, Tensor], start: int, x: Tensor, offset: int = 0) -> None:
        state[""][start:start + x.numel()].copy_(x)

    def layout(self, numel: int, offset: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"": ((numel,), torch.bfloat16)}


class BlockwiseCodec(Codec):
    """``bits``-bit codes of x / absmax(block) in a sorted code table (8-bit: one byte each, 4-bit: packed)."""

    def __init__(self, code: Tensor, bits: int, block_size: int = 256, signed: bool = True) -> None:
        if bits not in (4, 8):
            raise ValueError(f"BlockwiseCodec supports 4 or 8 bits, got {bits}")
        if not isinstance(block_size, int) or block_size < 1 or (bits == 4 and block_size % 2):
            raise ValueError(f"block_size must be a positive int (even for 4-bit), got {block_size!r}")
        if code.numel() > 2**bits:
            raise ValueError(f"a {bits}-bit codec needs at most {2**bits} code values, got {code.numel()}")
        self.bits, self.block_size, self.signed = bits, block_size, signed
        self.name = f"{bits}bit"
        self.table = quant.code_table(code, positive_floor=not signed)

    def init(self, numel: int, device: torch.device, offset: int = 0) -> dict[str, Tensor]:
        zero = int(self.table.nearest(torch.zeros(1, dtype=torch.float32))[0])  # code nearest 0 (absmax is 0)
        codes = torch.full((numel,), zero, dtype=torch.uint8, device=device)
        if self.bits == 4:
            codes = quant.pack_4bit(torch.cat([codes.new_full((offset % 2,), zero), codes]))
        absmax = torch.zeros(self._local_blocks(numel, offset), dtype=torch.float32, device=device)
        return {"_codes": codes, "_absmax": absmax}

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        flat = x.detach().reshape(-1).float().contiguous()
        state = self.init(flat.numel(), flat.device)
        if flat.numel():
            self.encode_range(state, 0, flat)
        return state

    # A shard of a global tensor starts at global value ``offset``: its blocks are the *global* blocks it overlaps
    # (so 1, 2 or 4 FSDP2 processes store identical codes and scales), and a 4-bit shard packs its codes in global
    # pairs (a leading pad nibble when ``offset`` is odd). offset=0 is the ordinary whole-tensor layout.
    def _local_blocks(self, numel: int, offset: int) -> int:
        b = self.block_size
        return (offset + numel - 1) // b - offset // b + 1 if numel else 0

    def _blocks(self, start: int, stop: int, offset: int = 0) -> slice:
        b, first = self.block_size, offset // self.block_size
        return slice((offset + start) // b - first, -(-(offset + stop) // b) - first)

    def _read_codes(self, state: dict[str, Tensor], start: int, stop: int, offset: int) -> Tensor:
        codes = state["_codes"]
        if self.bits == 8:
            return codes[start:stop]
        lo, hi = start + offset % 2, stop + offset % 2
        return quant.unpack_4bit(codes[lo // 2:(hi + 1) // 2], hi - lo // 2 * 2)[lo % 2:]

    def _write_codes(self, state: dict[str, Tensor], start: int, codes: Tensor, offset: int) -> None:
        stop = start + codes.numel()
        if self.bits == 8:
            state["_codes"][start:stop].copy_(codes)
            return
        lo, hi = start + offset % 2, stop + offset % 2
        dst = state["_codes"][lo // 2:(hi + 1) // 2]
        if lo % 2 or (hi % 2 and (hi + 1) // 2 < state["_codes"].numel()):  # a byte shared with a neighbour
            both = quant.unpack_4bit(dst, 2 * dst.numel()).clone()
            both[lo % 2:lo % 2 + codes.numel()] = codes
            codes = both
        dst.copy_(quant.pack_4bit(codes))

    def decode_range(self, state: dict[str, Tensor], start: int, stop: int, offset: int = 0) -> Tensor:
        codes = self._read_codes(state, start, stop, offset)
        out = torch.empty(stop - start, dtype=torch.float32, device=codes.device)
        return quant.dequantize_into(codes, state["_absmax"][self._blocks(start, stop, offset)], self.table,
                                     self.block_size, out, phase=(offset + start) % self.block_size)

    def encode_range(self, state: dict[str, Tensor], start: int, x: Tensor, offset: int = 0) -> None:
        if (offset + start) % self.block_size:
            raise ValueError(f"range start {offset + start} is not a multiple of block_size={self.block_size}")
        stop = start + x.numel()
        absmax = state["_absmax"][self._blocks(start, stop, offset)]
        x = x.reshape(-1)
        if self.bits == 8:
            quant.quantize_into(x, self.table, self.block_size, state["_codes"][start:stop], absmax, self.signed)
            return
        codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
        quant.quantize_into(x, self.table, self.block_size, codes, absmax, self.signed)
        self._write_codes(state, start, codes, offset)

    def encode_piece(self, state: dict[str, Tensor], start: int, x: Tensor, absmax: float, offset: int = 0) -> None:
        """Store values [start, start + len(x)) that lie in one block whose absmax (taken over the whole block,
        values on other processes included) is given: the block that straddles two FSDP2 shards."""
        block = self._blocks(start, start + x.numel(), offset)
        if block.stop - block.start != 1:
            raise ValueError(f"encode_piece: values {offset + start}..{offset + start + x.numel()} span "
                             f"{block.stop - block.start} blocks of {self.block_size}")
        state["_absmax"][block.start] = absmax
        scaled = x.reshape(-1).float() / (absmax if absmax > 0 else 1.0)
        self._write_codes(state, start, self.table.nearest(scaled.contiguous()), offset)

    def layout(self, numel: int, offset: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ncodes = numel if self.bits == 8 else (offset % 2 + numel + 1) // 2
        return {"_codes": ((ncodes,), torch.uint8),
                "_absmax": ((self._local_blocks(numel, offset),), torch.float32)}


_MAPS: dict[tuple[str, bool], Tensor] = {}


def _code(name: str, signed: bool) -> Tensor:
    if (name, signed) not in _MAPS:
        if name == "8bit":
            _MAPS[name, signed] = quant.dynamic_map(signed)
        elif signed:  # 4-bit first moment: dynamic map with 3 exponent bits (torchao / lpmm "DE")
            _MAPS[name, signed] = quant.dynamic_map(True, max_exponent_bits=3, total_bits=4)
        else:  # 4-bit second moment: linear map without zero (lpmm, avoids the zero-point problem)
            _MAPS[name, signed] = quant.linear_map(4, signed=False)
    return _MAPS[name, signed]


def get_codec(name: str, signed: bool = True, block_size: int = 256) -> Codec:
    """Codec by name: "fp32" | "bf16" | "8bit" | "4bit". ``signed`` picks the map for quantized codecs."""
    if name == "fp32":
        return Codec()
    if name == "bf16":
        return BF16Codec()
    if name in ("8bit", "4bit"):
        return BlockwiseCodec(_code(name, signed), int(name[0]), block_size, signed)
    raise ValueError(f"unknown state codec {name!r}; choose one of: {', '.join(CODECS)}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
