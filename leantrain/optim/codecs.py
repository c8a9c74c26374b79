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

    def init(self, numel: int, device: torch.device) -> dict[str, Tensor]:
        """Encoded all-zeros state of ``numel`` values."""
        return self.encode(torch.zeros(numel, dtype=torch.float32, device=device))

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.detach().reshape(-1).float().clone()}

    def decode(self, state: dict[str, Tensor], shape: Sequence[int]) -> Tensor:
        n = _numel(shape)
        return self.decode_range(state, 0, n).reshape(tuple(shape)).clone()

    def decode_range(self, state: dict[str, Tensor], start: int, stop: int) -> Tensor:
        """fp32 values [start, stop) of the flat moment (may be a view into the state for fp32)."""
        return state[""][start:stop]

    def encode_range(self, state: dict[str, Tensor], start: int, x: Tensor) -> None:
        """Store flat fp32 ``x`` as values [start, start + len(x)) (``start`` is a multiple of the block size)."""
        dst = state[""][start:start + x.numel()]
        if dst.data_ptr() != x.data_ptr():
            dst.copy_(x)

    def layout(self, numel: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected (shape, dtype) of each encoded tensor, for checking a loaded state_dict."""
        return {"": ((numel,), torch.float32)}

    def nbytes(self, numel: int) -> int:
        return sum(_numel(s) * torch.empty((), dtype=d).element_size() for s, d in self.layout(numel).values())


class BF16Codec(Codec):
    name = "bf16"

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.detach().reshape(-1).to(torch.bfloat16)}

    def decode_range(self, state: dict[str, Tensor], start: int, stop: int) -> Tensor:
        return state[""][start:stop].float()

    def encode_range(self, state: dict[str, Tensor], start: int, x: Tensor) -> None:
        state[""][start:start + x.numel()].copy_(x)

    def layout(self, numel: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
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

    def init(self, numel: int, device: torch.device) -> dict[str, Tensor]:
        zero = int(self.table.nearest(torch.zeros(1, dtype=torch.float32))[0])  # code nearest 0 (absmax is 0)
        nb = quant.n_blocks(numel, self.block_size)
        codes = torch.full((numel,), zero, dtype=torch.uint8, device=device)
        if self.bits == 4:
            codes = quant.pack_4bit(codes)
        return {"_codes": codes, "_absmax": torch.zeros(nb, dtype=torch.float32, device=device)}

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        flat = x.detach().reshape(-1).float().contiguous()
        state = self.init(flat.numel(), flat.device)
        if flat.numel():
            self.encode_range(state, 0, flat)
        return state

    def _blocks(self, start: int, stop: int) -> slice:
        b = self.block_size
        if start % b:
            raise ValueError(f"range start {start} is not a multiple of block_size={b}")
        return slice(start // b, -(-stop // b))

    def decode_range(self, state: dict[str, Tensor], start: int, stop: int) -> Tensor:
        codes = state["_codes"]
        codes = quant.unpack_4bit(codes[start // 2:(stop + 1) // 2], stop - start) if self.bits == 4 \
            else codes[start:stop]
        out = torch.empty(stop - start, dtype=torch.float32, device=codes.device)
        return quant.dequantize_into(codes, state["_absmax"][self._blocks(start, stop)], self.table,
                                     self.block_size, out)

    def encode_range(self, state: dict[str, Tensor], start: int, x: Tensor) -> None:
        stop = start + x.numel()
        absmax = state["_absmax"][self._blocks(start, stop)]
        x = x.reshape(-1)
        if self.bits == 8:
            quant.quantize_into(x, self.table, self.block_size, state["_codes"][start:stop], absmax, self.signed)
        else:
            codes = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
            quant.quantize_into(x, self.table, self.block_size, codes, absmax, self.signed)
            state["_codes"][start // 2:(stop + 1) // 2].copy_(quant.pack_4bit(codes))

    def layout(self, numel: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ncodes = numel if self.bits == 8 else (numel + 1) // 2
        return {"_codes": ((ncodes,), torch.uint8),
                "_absmax": ((quant.n_blocks(numel, self.block_size),), torch.float32)}


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
