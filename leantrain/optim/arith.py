"""Gather-free (arithmetic) nearest-code encode and decode of the built-in maps, bit-identical to the table codec.

The dynamic (tree) map of bitsandbytes, ``quant.dynamic_map(signed, E, bits)``, in *position* terms: a magnitude
position ``k = 2**w + j`` (``w`` = the highest set bit of ``k``) names code ``j`` of decade ``i = w - x``, where
``x`` is 1 for the unsigned map (its sign bit is one more fraction bit) and 0 for the signed map. Decade ``i``
(scale ``10**(i - E + 1)``) splits [0.1, 1] into ``nb = 2**w`` equal bins and stores the bin centres::

    value(k) = fl32(10**(i-E+1)) * ((b[j] + b[j+1]) / 2),   b = torch.linspace(0.1, 1, nb + 1) in float32

(torch's linspace computes ``b[t] = fma(step, t, 0.1)`` for ``t < (nb+1)//2`` and ``fma(-step, nb - t, 1)`` above,
``step = (1 - 0.1)/nb`` in float32; reproduced here with one float64 multiply-add, exact because the product
has at most 33 significant bits). Position ``2**x - 1`` is 0 and ``2**(E+x)`` is 1.0. Code indices are the sorted
table's: ``zc + k`` / ``zc - k`` (signed, ``zc = 2**E - 1``, the zero code) or ``k - 1`` (unsigned).

Nearest code of ``s`` (the table rule: the number of midpoints ``(code[c] + code[c+1]) / 2`` strictly below ``s``):
``P(a) = 2**w * (a * 10**(E-1-i) + 0.8) / 0.9 - 0.5`` is continuous, piecewise linear and equals ``k`` at every
code value (``i`` = how many decade thresholds ``10**(t-E)`` lie at or below ``a = |s|``; both neighbouring
decades give the same ``P`` at a threshold). Midpoints sit at ``P = k + 0.5`` inside a decade, ``P = 2**w - 0.3``
between decades; the zero code owns ``P`` in [0.39, 0.69] (signed) or [1.28, 1.64] (unsigned). So ``floor(P + 0.25)`` is the exact answer or one
below it, and one exact comparison with the true midpoint (both neighbours decoded exactly, as above) finishes:
ties go to the lower code (for negative values that is the larger magnitude). ``positive_floor`` (second moments)
makes the midpoint above the zero code 0 for positive values. The 4-bit second-moment map ``k/16`` (no zero) is
``clamp(ceil(16 s - 1.5), 0, 15)``.

Only elementwise tensor ops (compares, selects, integer and float arithmetic): the same functions run eagerly and
inside ``torch.compile`` graphs. Measured (docs/optimizers.md, "Arithmetic codec"): exactness costs ~100 vector ops
per dynamic-map value (decade and linspace bounds in float64, decimal scales, bit casts; encoding decodes two
neighbours), so on this CPU
the dynamic map is 6-8x *slower* than inductor's scalar table gathers and 60-300x slower than the eager lookup; only
the linear 4-bit map (4 ops) beats its table. ``faster_than_table`` records that, and only those forms are used by
the codecs; the dynamic form stays as the closed-form definition the tables are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_NINE = float(torch.tensor(1.0) - torch.tensor(0.1))  # (1 - 0.1) in float32: torch's linspace step numerator
_TENTH = float(torch.tensor(0.1))


@dataclass(frozen=True)
class DynamicMap:
    """``quant.dynamic_map(signed, decades, bits)``: ``decades`` = max_exponent_bits, ``x`` = 1 if unsigned."""

    decades: int
    x: int
    faster_than_table = False  # measured: ~100 ops per value (module docstring)

    @property
    def zero_code(self) -> int:
        return 2**self.decades - 1 if self.x == 0 else 0

    @property
    def top(self) -> int:
        """Position of the value 1.0 (the largest positive position)."""
        return 2 ** (self.decades + self.x)

    def position_values(self, k: Tensor) -> Tensor:
        """value(k) in float32 for int32 positions ``2**x - 1 <= k <= top`` (see the module docstring)."""
        kf = k.to(torch.float32)
        kbits = kf.view(torch.int32)
        p = (kbits & 0x7F800000).view(torch.float32)  # 2**w: k with its mantissa cleared (nb, bins of the decade)
        w = (kbits >> 23) - 127
        j = kf - p
        step = _NINE / p  # exact: division by a power of two
        half = torch.floor((p + 1.0) * 0.5)
        mean = (_bound(j, p, step, half) + _bound(j + 1.0, p, step, half)) * 0.5
        scale = 1.0 / _pow10(self.decades - 1 + self.x - w, self.decades - 1)  # == fl32(10**(i-E+1)), tested
        value = scale * mean
        value = torch.where(k >= self.top, 1.0, value)
        return torch.where(k <= 2**self.x - 1, 0.0, value)

    def decode(self, codes: Tensor) -> Tensor:
        """float32 code values of integer ``codes`` (any integer dtype)."""
        c = codes.to(torch.int32)
        if self.x:
            return self.position_values(c + 1)
        d = c - self.zero_code
        v = self.position_values(d.abs())
        return torch.where(d < 0, -v, v)

    def estimate(self, a: Tensor) -> Tensor:
        """floor(P(a) + 0.25) for magnitudes 0 <= a <= 1, clamped to [zero position, top - 1]: the nearest
        position or the one below it."""
        i = torch.zeros_like(a, dtype=torch.int32)
        for t in range(1, self.decades):
            i = i + (a >= 10.0 ** (t - self.decades)).to(torch.int32)
        u = a * _pow10(self.decades - 1 - i, self.decades - 1)  # a / 10**(i-E+1), in [0.1, 1) inside decade i
        nb = (i + self.x).to(torch.float32).exp2()
        k = torch.floor(nb * ((u + 0.8) * (1.0 / 0.9)) - 0.25).to(torch.int32)
        return k.clamp(2**self.x - 1, self.top - 1)

    def nearest(self, s: Tensor, positive_floor: bool, out: Tensor | None = None) -> Tensor:
        """int32 index of the nearest code of float32 ``s`` (= ``bucketize(s, midpoints)``; values beyond
        [-1, 1] take the end codes), or copied into ``out`` (e.g. uint8) when given."""
        idx = self._nearest(s, positive_floor)
        return idx if out is None else out.copy_(idx)

    def _nearest(self, s: Tensor, positive_floor: bool) -> Tensor:
        neg = s.view(torch.int32) < 0  # the sign bit, so -0.0 counts as negative, as bucketize treats it
        a = s.abs().clamp_max(1.0) if self.x == 0 else s.clamp(0.0, 1.0)
        k = self.estimate(a)
        mid = (self.position_values(k) + self.position_values(k + 1)) * 0.5
        if positive_floor:
            mid = torch.where((k == 2**self.x - 1) & ~neg, 0.0, mid)
        k = k + torch.where(neg, a >= mid, a > mid).to(torch.int32)
        if self.x:
            return k - 1
        return torch.where(neg, self.zero_code - k.clamp_max(self.top - 1), self.zero_code + k)


@dataclass(frozen=True)
class Linear16:
    """``quant.linear_map(4, signed=False)``: k/16 for k = 1..16 (no zero; positive_floor changes nothing)."""

    faster_than_table = True  # measured: eager encode ~2x faster than the lookup, no gather when compiled

    def decode(self, codes: Tensor) -> Tensor:
        return (codes.to(torch.int32) + 1).to(torch.float32) * 0.0625

    def nearest(self, s: Tensor, positive_floor: bool, out: Tensor | None = None) -> Tensor:
        """Midpoints (2c + 3)/32, c = 0..14: the count below s is ceil(16 s - 1.5), exact in float32 (16 s is
        exact, and so is 16 s - 1.5 wherever the ceiling is above 0). int32, or copied into ``out``."""
        t = torch.mul(s, 16.0).sub_(1.5).ceil_().clamp_(0.0, 15.0)  # in place after the first op: one temporary
        return t.to(torch.int32) if out is None else out.copy_(t)


def _bound(t: Tensor, nb: Tensor, step: Tensor, half: Tensor) -> Tensor:
    """torch.linspace(0.1, 1, nb + 1, float32)[t]: a fused multiply-add from the nearer end, rounded once."""
    s, t, nb = step.double(), t.double(), nb.double()
    return torch.where(t < half, s * t + _TENTH, 1.0 - s * (nb - t)).to(torch.float32)


def _pow10(n: Tensor, max_n: int) -> Tensor:
    """10**n as an exact float32 (0 <= n <= max_n <= 7) from the bits of n: no table, no pow()."""
    out = torch.ones_like(n, dtype=torch.float32)
    for b in range(max(1, max_n.bit_length())):
        out = out * torch.where((n >> b) & 1 == 1, float(10 ** (2**b)), 1.0)
    return out


ArithMap = DynamicMap | Linear16

_BUILTIN: list[tuple[Tensor, ArithMap]] = []


def for_code(code: Tensor) -> ArithMap | None:
    """The arithmetic form of ``code`` if it is one of the built-in maps (same float32 values), else None."""
    if not _BUILTIN:  # built on first use: quant imports this module
        from . import quant

        _BUILTIN.extend([(quant.dynamic_map(True), DynamicMap(7, 0)), (quant.dynamic_map(False), DynamicMap(7, 1)),
                         (quant.dynamic_map(True, 3, 4), DynamicMap(3, 0)),
                         (quant.linear_map(4, signed=False), Linear16())])
    code = code.detach().to("cpu", torch.float32).flatten()
    for ref, amap in _BUILTIN:
        if code.shape == ref.shape and torch.equal(code, ref):
            return amap
    return None


def faster_form(code: Tensor) -> ArithMap | None:
    """The arithmetic form of ``code`` where it is measured faster than the table lookup, else None."""
    amap = for_code(code)
    return amap if amap is not None and amap.faster_than_table else None
