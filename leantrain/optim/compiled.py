"""Opt-in ``torch.compile`` (inductor) path for the 8-bit / 4-bit Adam(W) step: one fused kernel per chunk.

Paper: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, ICLR 2022, https://arxiv.org/abs/2110.02861.

Why: the eager chunk loop in adam.py makes ~30 elementwise passes over every chunk (decode, Adam math, absmax,
nearest-code lookups), so it is memory- and dispatch-bound on CPU. Here one traced function does, per block of
``block_size`` values: dequantize m and v (code table[codes] * absmax), the Adam(W) update, the parameter update,
the new per-block absmax of m and v, and the nearest-code re-quantization. Inductor fuses all of it into one C++
loop over blocks that keeps each block's fp32 m and v in block-sized local buffers.

Numerics: the function repeats the eager ops in the same order, with ``prims.fma`` wherever the eager CPU
kernels fuse a multiply-add (``lerp_``, ``addcmul_``, ``add_(alpha=)``), and the nearest code is exactly
``bucketize(s, midpoints)`` (ties to the lower code; a 32768-entry table of packed (code, threshold) pairs,
equivalent to quant.CodeTable). A map with a closed form measured faster than its table (``arith.faster_form``:
the 4-bit second-moment map k/16) is decoded and encoded by that formula instead -- no gather, same codes. So m, v, their codes and absmax are bit-identical to the eager path (AdamW:
these never depend on the parameter). One op differs: eager ``Tensor.sqrt`` on CPU (MKL VML) is not correctly
rounded (~17% of values are 1 ulp off), while inductor's is, so the parameter update can differ by ~1 ulp of
``lr * update`` per step; the tests state the bound. For Adam (L2 decay folded into the gradient) those
parameter ulps feed back into m, so an occasional code may differ by one step.

Shapes: full chunks of the optimizer's ``chunk_size`` are passed as (blocks, block_size) views of the state,
the remaining full blocks as one more view, and a partial last block through a 2-block staging copy padded with
the code nearest 0 (its values are then 0, or for a code table without 0 no larger than any real value of the
block, so the absmax is unchanged). Dimension 0 is marked dynamic (>= 2), so one compilation per variant
(8/4 bits, decoupled/coupled decay, grad dtype, block size) serves every tensor size; hyperparameters travel
as tensors, so changing lr or the step count never recompiles.

If ``torch.compile`` is unavailable or fails (no C++ compiler, unsupported Python, ...), :func:`update`
warns once per process and returns how far it got; the caller finishes with the eager loop.
"""
from __future__ import annotations

import math
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import arith, quant

_BACKEND: str | Callable = "inductor"  # torch.compile backend (a test swaps in a failing one)
_FNS: dict[tuple, Callable] = {}  # (bits, coupled, closed forms) -> compiled chunk function
_MARKED: set[tuple] = set()  # variants already traced with a dynamic dim 0 (marking costs ~20 us per call)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CodeTable -> {device: packed table}
_failed: str | None = None  # why the compiled path was given up in this process (warned once)


def packed_table(table: quant.CodeTable, device: torch.device) -> Tensor:
    """int32 lookup for the nearest code of s in [-1, 1], one gather per value.

    Key = (sign << 14) | (top 16 bits of |s| & 0x3FFF): |s| <= 1 has exponent <= 127, so 14 bits cover every
    top-16-bit bucket of quant.CodeTable. Entry = (lo << 16) | thr: ``lo`` is the bucket's lower code and ``thr``
    the low 16 bits of the one midpoint inside the bucket (bit-flipped for negative buckets, 0xFFFF if none), so
    ``code = lo + (low16(s) (flipped if s < 0) > thr)`` -- the float comparison ``s > mid`` done on bits."""
    per_dev = _PACKED.setdefault(table, {})
    if device not in per_dev:
        k = torch.arange(32768, dtype=torch.int64)
        h = ((k >> 14) << 15) | (k & 0x3FFF)
        lo = table.lo.to(torch.int64)[h]
        mid = table.mid[h]
        low = mid.view(torch.int32).to(torch.int64) & 0xFFFF
        thr = torch.where(k >= 16384, low ^ 0xFFFF, low)
        thr = torch.where(torch.isfinite(mid), thr, torch.full_like(thr, 0xFFFF))
        per_dev[device] = ((lo << 16) | thr).to(torch.int32).to(device)
    return per_dev[device]


def _nearest(s: Tensor, tab: Tensor) -> Tensor:
    b = s.view(torch.int32)
    e = torch.ops.aten._unsafe_index(tab, [((b >> 16) & 0x3FFF) | ((b >> 17) & 0x4000)])
    low = (b ^ (b >> 31)) & 0xFFFF
    return (e >> 16) + (low > (e & 0xFFFF)).to(torch.int32)


def _unpack(c: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return c.to(torch.int32)
    return torch.stack((c >> 4, c & 0x0F), dim=-1).reshape(c.shape[0], -1).to(torch.int32)


def _pack(q: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return q.to(torch.uint8)
    q = q.reshape(q.shape[0], -1, 2)
    return ((q[..., 0] << 4) | q[..., 1]).to(torch.uint8)


def _decoder(form: arith.ArithMap | None) -> Callable[[Tensor, Tensor], Tensor]:
    """code values of int32 codes: the closed form where it is faster (no gather), else ``code[codes]``."""
    if form is not None:
        return lambda codes, _code: form.decode(codes)
    return lambda codes, code: torch.ops.aten._unsafe_index(code, [codes])


def _encoder(form: arith.ArithMap | None, positive_floor: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """nearest code of s in [-1, 1]: the closed form where it is faster, else the packed-table lookup."""
    if form is not None:
        return lambda s, _tab: form.nearest(s, positive_floor)
    return _nearest


def _make(bits: int, coupled: bool, forms: tuple = (None, None)) -> Callable:
    """The per-chunk graph. hp = [lerp coeff, lerp weight small (1/0), b2, 1-b2, eps*bc2, decay, wd, gscale];
    ``rows`` holds the step -lr*s once per block (a per-block input keeps the parameter update inside the
    per-block loop that inductor builds around the absmax reductions, instead of a second pass). ``forms``:
    the arith closed forms (or None) of the m and v maps; v is the positive-floored second moment."""
    dec_m, dec_v = _decoder(forms[0]), _decoder(forms[1])
    enc_m, enc_v = _encoder(forms[0], False), _encoder(forms[1], True)

    def adam_blocks(p, g, mc, ma, vc, va, mcode, vcode, mtab, vtab, hp, rows):
        fma = torch.ops.prims.fma  # registered by inductor (imported by the time this is traced)
        g = g.float() * hp[7]
        if coupled:  # Adam: g.add(p, alpha=wd)
            g = fma(p, hp[6], g)
        m = dec_m(_unpack(mc, bits), mcode) * ma[:, None]
        v = dec_v(_unpack(vc, bits), vcode) * va[:, None]
        m = fma(hp[0], g - m, torch.where(hp[1] > 0, m, g))  # m.lerp_(g, 1 - b1)
        v = fma(hp[3] * g, g, v * hp[2])  # v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = m / (v.sqrt() + hp[4])
        p_new = fma(u, rows[:, None], p * hp[5])  # p.mul_(1 - lr*wd).add_(u, alpha=-lr*s)
        if not coupled:  # written in place; coupled reads p above, and in-graph mutation of an input that the
            p.copy_(p_new)  # same kernel reads trips inductor 2.13's local-buffer fusion (KeyError): returned instead
        am = m.abs().amax(1)
        av = v.amax(1)
        qm = enc_m(m / torch.where(am == 0, 1.0, am)[:, None], mtab)
        qv = enc_v(v / torch.where(av == 0, 1.0, av)[:, None], vtab)
        return am, av, _pack(qm, bits), _pack(qv, bits), p_new if coupled else None

    # dynamo caches compiled graphs (and counts its recompile limit) per code object: give each variant its own
    name = f"adam{bits}bit_{'coupled' if coupled else 'decoupled'}{'_arith' * any(forms)}_blocks"
    code = adam_blocks.__code__.replace(co_name=name, **({"co_qualname": name} if hasattr(
        adam_blocks.__code__, "co_qualname") else {}))  # co_qualname: Python >= 3.11
    fn = types.FunctionType(code, adam_blocks.__globals__, name, None, adam_blocks.__closure__)
    return torch.compile(fn, fullgraph=True, backend=_BACKEND)


def _fn(bits: int, coupled: bool, forms: tuple) -> Callable:
    if (bits, coupled, forms) not in _FNS:
        _FNS[bits, coupled, forms] = _make(bits, coupled, forms)
    return _FNS[bits, coupled, forms]


def hyper(group: dict[str, Any], t: int, scale: float, device: torch.device) -> tuple[Tensor, float]:
    """The float32 values the eager path hands to its kernels (eager rounds each Python float to float32)."""
    b1, b2 = group["betas"]
    lr, wd = group["lr"], group.get("weight_decay", 0.0)
    decoupled = group.get("decoupled", True)
    bc2 = math.sqrt(1.0 - b2**t)
    w = torch.tensor(1.0 - b1, dtype=torch.float32)
    small = abs(float(w)) < 0.5
    coeff = float(w) if small else float(w - 1)
    hp = torch.tensor([coeff, 1.0 if small else 0.0, b2, 1.0 - b2, group["eps"] * bc2,
                       1.0 - lr * wd if wd and decoupled else 1.0, wd, scale], dtype=torch.float32, device=device)
    return hp, -lr * (bc2 / (1.0 - b1**t))


def _warn_once(reason: str) -> None:
    global _failed
    if _failed is None:
        _failed = reason
        warnings.warn(f"leantrain: the compiled 8/4-bit Adam path is unavailable ({reason}); falling back to the "
                      f"eager path for the rest of this process", RuntimeWarning, stacklevel=4)


def available() -> bool:
    """False once compilation failed in this process (or torch.compile cannot run here at all)."""
    if _failed is not None:
        return False
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        _warn_once("torch.compile is not supported by this Python/torch build")
        return False
    return True


def update(pflat: Tensor, gflat: Tensor, codecs: list, encs: list[dict[str, Tensor]], group: dict[str, Any],
           t: int, scale: float, chunk: int) -> int:
    """Apply one Adam(W) step to the flat fp32 parameter ``pflat`` and its two block-wise moments; return the
    number of leading values done (all of them, or fewer if compilation failed -- the caller continues eagerly)."""
    pflat = pflat.detach()  # a view of the parameter: same storage, no autograd flags in the compile guards
    (_, cm), (_, cv) = codecs
    em, ev = encs
    bits, bs = cm.bits, cm.block_size
    if not available() or cv.bits != bits or cv.block_size != bs or not (cm.table.fast and cv.table.fast):
        return 0
    wd = group.get("weight_decay", 0.0)
    coupled = bool(wd) and not group.get("decoupled", True)
    dev = pflat.device
    hp, step = hyper(group, t, scale, dev)
    tabs = (cm.table.on(dev)[0], cv.table.on(dev)[0], packed_table(cm.table, dev), packed_table(cv.table, dev))
    n = pflat.numel()
    cb = bs if bits == 8 else bs // 2  # code bytes per block
    nb_chunk = max(2, chunk // bs)
    nfull = n // bs
    rows_all = torch.full((max(2, min(nb_chunk, nfull)),), step, dtype=torch.float32, device=dev)
    # [start block, stop block) of the view calls; the rest goes through the padded staging call
    spans = [(b, min(b + nb_chunk, nfull)) for b in range(0, nfull, nb_chunk)]
    if spans and spans[-1][1] - spans[-1][0] < 2:
        spans.pop()
    done = 0
    try:
        fn = _fn(bits, coupled, (cm.table.formula, cv.table.formula))
        for b0, b1 in spans:
            nb = b1 - b0
            mc = em["_codes"][b0 * cb:b1 * cb].view(nb, cb)
            vc = ev["_codes"][b0 * cb:b1 * cb].view(nb, cb)
            ma, va = em["_absmax"][b0:b1], ev["_absmax"][b0:b1]
            args = [pflat[b0 * bs:b1 * bs].view(nb, bs), gflat[b0 * bs:b1 * bs].view(nb, bs), mc, ma, vc, va,
                    *tabs, hp, rows_all[:nb]]
            am, av, qm, qv, pn = _call(fn, args, (bits, coupled, gflat.dtype, bs, dev))
            ma.copy_(am), va.copy_(av), mc.copy_(qm), vc.copy_(qv)
            if pn is not None:
                args[0].copy_(pn)
            done = b1 * bs
        if done < n:
            _staged(fn, (bits, coupled, gflat.dtype, bs, dev), pflat, gflat, cm, cv, em, ev, done, tabs, hp,
                    rows_all[:2])
            done = n
    except Exception as exc:  # noqa: BLE001 - any compile/runtime failure: the eager path is always correct
        _warn_once(_describe(exc))
    return done


def _describe(exc: BaseException) -> str:
    """'Outer: root cause' with the first line of the innermost exception (dynamo wraps the real error)."""
    root = exc
    for _ in range(20):
        nxt = root.__cause__ or getattr(root, "inner_exception", None)
        if nxt is None:
            break
        root = nxt
    lines = str(root).strip().splitlines()
    msg = f"{type(root).__name__}: {lines[0][:300] if lines else ''}"
    return msg if root is exc else f"{type(exc).__name__} <- {msg}"


def _call(fn: Callable, args: list[Tensor], variant: tuple) -> tuple:
    """Run the compiled chunk function; the first call of a variant marks dim 0 (blocks) dynamic, so that one
    trace serves every number of blocks >= 2 (dynamo reuses it for unmarked calls)."""
    key = (id(fn), *variant)
    if key not in _MARKED:
        for i in (0, 1, 2, 3, 4, 5, 11):
            torch._dynamo.mark_dynamic(args[i], 0)
    out = fn(*args)
    _MARKED.add(key)
    return out


def _staged(fn: Callable, variant: tuple, pflat: Tensor, gflat: Tensor, cm, cv, em, ev, start: int, tabs,
            hp: Tensor, rows: Tensor) -> None:
    """The last < 2 blocks (incl. a partial block), padded to 2 blocks with zero gradient, zero parameter and
    the code nearest 0; results are cut back to the real length."""
    bs = cm.block_size
    n = pflat.numel() - start
    blocks = quant.n_blocks(n, bs)
    dev = pflat.device
    p2 = torch.zeros(2 * bs, dtype=torch.float32, device=dev)
    g2 = torch.zeros(2 * bs, dtype=gflat.dtype, device=dev)
    p2[:n], g2[:n] = pflat[start:], gflat[start:]
    staged = []
    for c, e in ((cm, em), (cv, ev)):
        pad = c.init(2 * bs, dev)
        full = _codes(c, pad, 0, 2 * bs)
        full[:n] = _codes(c, e, start, n)
        pad["_codes"] = full if c.bits == 8 else quant.pack_4bit(full)
        pad["_absmax"][:blocks] = e["_absmax"][start // bs:start // bs + blocks]
        staged.append(pad)
    sm, sv = staged
    args = [p2.view(2, bs), g2.view(2, bs), sm["_codes"].view(2, -1), sm["_absmax"], sv["_codes"].view(2, -1),
            sv["_absmax"], *tabs, hp, rows]
    am, av, qm, qv, pn = _call(fn, args, variant)
    pflat[start:].copy_((p2 if pn is None else pn.reshape(-1))[:n])
    for c, e, a, q in ((cm, em, am, qm), (cv, ev, av, qv)):
        e["_absmax"][start // bs:start // bs + blocks].copy_(a[:blocks])
        q = q.reshape(-1)
        if c.bits == 8:
            e["_codes"][start:].copy_(q[:n])
        else:
            e["_codes"][start // 2:].copy_(quant.pack_4bit(quant.unpack_4bit(q, 2 * bs)[:n]))


def _codes(c, e: dict[str, Tensor], start: int, n: int) -> Tensor:
    """Unpacked uint8 codes [start, start + n) of an encoded moment."""
    if c.bits == 8:
        return e["_codes"][start:start + n].clone()
    return quant.unpack_4bit(e["_codes"][start // 2:(start + n + 1) // 2], n).clone()
