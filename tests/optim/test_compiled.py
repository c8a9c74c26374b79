"""The opt-in torch.compile path of the 8/4-bit Adam(W) step (leantrain/optim/compiled.py) against the eager path.

Stated tolerance (see compiled.py): moments, codes and absmax are bit-identical to eager for AdamW; parameters may
differ because eager ``Tensor.sqrt`` on CPU (MKL) is not correctly rounded while inductor's is -- by at most
``2 * steps`` float32 ulps of the largest |p|, on a small fraction of the elements. Tests that compile are slow
(a cold inductor compile took 20-30 s on this shared machine) and marked ``slow``; the default run checks the lookup table, the
option checks, the fallback and load_state_dict without compiling.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from leantrain.optim import Adam8bit, AdamW4bit, AdamW8bit, Lion8bit, SGD8bit, compiled, quant
from leantrain.optim.codecs import get_codec

EPS32 = torch.finfo(torch.float32).eps


def _run(make, shape, steps, seed=0, dtype=torch.float32, opt=None, p=None):
    g = torch.Generator().manual_seed(seed)
    if p is None:
        p = nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    opt = opt or make([p])
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=g).to(dtype)
        opt.step()
    return p, opt


def _state(opt):
    return next(iter(opt.state.values()))


# ---- default run: no compilation -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_packed_table_is_round_to_nearest_like_bucketize(bits, signed):
    """The one-gather lookup equals bucketize over the code midpoints (ties to the lower code) on every code,
    every midpoint and its float neighbours, +-0, subnormals and random values -- run eagerly, no compile."""
    table = get_codec(f"{bits}bit", signed).table
    mids = (table.code[:-1] + table.code[1:]) / 2
    if not signed and table.code[0] == 0:  # second moments: a positive value never rounds to the zero code
        mids[0] = 0.0
    edge = torch.cat([table.code, mids, torch.nextafter(mids, torch.tensor(2.0)),
                      torch.nextafter(mids, torch.tensor(-2.0))])
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(200_000, generator=g) ** 4  # dense near 0, where the dynamic map is dense too
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 1.2e-38, 1e-30, 1e-7, 1.0])
    s = torch.cat([edge, rand, special]).clamp(-1, 1)
    s = torch.cat([s, -s]) if signed else s.abs()
    ours = compiled._nearest(s, compiled.packed_table(table, s.device))
    ref = torch.bucketize(s, mids)
    assert torch.equal(ours.long(), ref)


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_kernel_codec_parts_equal_the_eager_codec(bits, signed):
    """The decoder/encoder the kernel traces for each map (closed form where arith measured it faster, else the
    tables), run eagerly: every code decodes to the table value, every value encodes like the eager codec."""
    table = get_codec(f"{bits}bit", signed).table
    codes = torch.arange(table.code.numel(), dtype=torch.int32)
    assert torch.equal(compiled._decoder(table.formula)(codes, table.code), table.code)
    mids = quant._midpoints(table.code, not signed)
    g = torch.Generator().manual_seed(2)
    s = torch.cat([table.code, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.rand(100_000, generator=g)])
    s = torch.cat([s, -s]) if signed else s
    enc = compiled._encoder(table.formula, not signed)(s, compiled.packed_table(table, s.device))
    assert torch.equal(enc.to(torch.uint8), table.nearest(s))


def test_compile_option_is_checked():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match="compile='yes'"):
        AdamW8bit([p], compile="yes")
    for cls in (Lion8bit, SGD8bit):
        with pytest.raises(ValueError, match="compile=True .* only implemented for Adam"):
            cls([{"params": [p], "compile": True}])


def test_load_state_dict_keeps_this_processs_compile_choice():
    """compile is how this process runs, not training state: a loaded checkpoint does not switch it."""
    _, eager = _run(lambda ps: AdamW8bit(ps, compile=False), (64,), 2)
    sd = eager.state_dict()
    fresh = AdamW8bit([nn.Parameter(torch.zeros(64))], compile=True)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["compile"] is True
    sd["param_groups"][0]["compile"] = True
    back = AdamW8bit([nn.Parameter(torch.zeros(64))])
    back.load_state_dict(sd)
    assert back.param_groups[0]["compile"] is False


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found (simulated)")


@pytest.mark.parametrize("how", ["compile fails", "dynamo unsupported"])
def test_fallback_warns_once_and_runs_eager(monkeypatch, how):
    monkeypatch.setattr(compiled, "_failed", None)
    monkeypatch.setattr(compiled, "_FNS", {})
    if how == "compile fails":
        monkeypatch.setattr(compiled, "_BACKEND", _broken_backend)
    else:
        monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = [_run(lambda ps, c=cls: c(ps, compile=True, lr=1e-2), shape, 2)[0] for cls, shape in
               ((AdamW8bit, (4097,)), (AdamW4bit, (300, 20)))]
    ours = [w for w in rec if "compiled 8/4-bit Adam path is unavailable" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert ("simulated" if how == "compile fails" else "not supported") in str(ours[0].message)
    assert not compiled.available()
    ref = [_run(lambda ps, c=cls: c(ps, lr=1e-2), shape, 2)[0] for cls, shape in
           ((AdamW8bit, (4097,)), (AdamW4bit, (300, 20)))]
    for a, b in zip(got, ref):
        assert torch.equal(a, b)  # the fallback is the eager path itself


# ---- slow: these compile ---------------------------------------------------------------------------------------
def _assert_close_params(a, b, steps, frac=0.05):
    a, b = a.detach().float(), b.detach().float()
    bound = 2 * steps * EPS32 * b.abs().max().item()
    assert (a - b).abs().max().item() <= bound
    assert (a != b).float().mean().item() <= frac


def _assert_same_state(sa, sb, code_tol=0):
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.endswith("_codes") and code_tol:
            d = (sa[k].int() - sb[k].int()).abs()
            assert d.max() <= code_tol and (d > 0).float().mean() <= 1e-3, k
        elif k.endswith("_absmax") and code_tol:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=0)
        else:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


CASES = [  # (class, shape, kwargs, codes may differ by this many steps (Adam: p feeds back into m))
    (AdamW8bit, (4097,), {"lr": 1e-2, "weight_decay": 0.1}, 0),
    (AdamW8bit, (257, 33), {"lr": 1e-2, "chunk_size": 1024}, 0),  # 8 view chunks + 1 block + partial (staged)
    (AdamW8bit, (300,), {"lr": 1e-3, "min_8bit_size": 0}, 0),  # staged only
    (AdamW8bit, (257, 33), {"lr": 1e-2, "percentile_clipping": 5, "betas": (0.4, 0.9)}, 0),  # lerp weight >= 0.5
    (AdamW4bit, (4097,), {"lr": 1e-2}, 0),
    (AdamW4bit, (257, 33), {"lr": 1e-2, "chunk_size": 1024}, 0),
    (Adam8bit, (4097,), {"lr": 1e-2, "weight_decay": 0.1}, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("cls,shape,kw,code_tol", CASES)
def test_matches_eager_over_steps(cls, shape, kw, code_tol):
    steps = 6
    pc, oc = _run(lambda ps: cls(ps, compile=True, **kw), shape, steps)
    pe, oe = _run(lambda ps: cls(ps, **kw), shape, steps)
    assert compiled.available()
    _assert_same_state(_state(oc), _state(oe), code_tol)
    _assert_close_params(pc, pe, steps)


@pytest.mark.slow
def test_bf16_parameters_and_gradients():
    pc, oc = _run(lambda ps: AdamW8bit(ps, compile=True, lr=1e-2), (257, 33), 4, dtype=torch.bfloat16)
    pe, oe = _run(lambda ps: AdamW8bit(ps, lr=1e-2), (257, 33), 4, dtype=torch.bfloat16)
    _assert_same_state(_state(oc), _state(oe))
    assert pc.dtype == torch.bfloat16
    assert (pc.float() - pe.float()).abs().max() <= 2 ** -7 * pe.float().abs().max()  # <= 1 bf16 ulp
    assert (pc != pe).float().mean() <= 0.01
    assert compiled.available()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit])
def test_state_dict_round_trip_and_switching_compile_mid_run(cls):
    shape, kw = (257, 33), {"lr": 1e-2, "chunk_size": 2048}
    # uninterrupted compiled run
    p_ref, o_ref = _run(lambda ps: cls(ps, compile=True, **kw), shape, 6)
    # compiled 3 steps, save/load into a fresh compiled optimizer, 3 more: bit-identical
    p1, o1 = _run(lambda ps: cls(ps, compile=True, **kw), shape, 3)
    p2 = nn.Parameter(p1.detach().clone())
    o2 = cls([p2], compile=True, **kw)
    o2.load_state_dict(_roundtrip(o1.state_dict()))
    g = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=g)
    for _ in range(3):  # replay the same gradient stream from step 4 on
        torch.randn(shape, generator=g)
    for _ in range(3):
        p2.grad = torch.randn(shape, generator=g)
        o2.step()
    assert torch.equal(p2, p_ref)
    _assert_same_state(_state(o2), _state(o_ref))
    # switching mid-run (compiled -> eager -> compiled) follows the pure eager run: same codes, params within ulps
    p_e, o_e = _run(lambda ps: cls(ps, **kw), shape, 6)
    p_s, o_s = _run(lambda ps: cls(ps, compile=True, **kw), shape, 2)
    g = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=g)
    for _ in range(2):
        torch.randn(shape, generator=g)
    for flag in (False, False, True, True):
        o_s.param_groups[0]["compile"] = flag
        p_s.grad = torch.randn(shape, generator=g)
        o_s.step()
    _assert_same_state(_state(o_s), _state(o_e))
    _assert_close_params(p_s, p_e, 6)
    assert compiled.available()


@pytest.mark.slow
def test_no_recompiles_for_new_sizes_lr_or_step():
    """One compiled graph per variant: a learning-rate schedule, new step counts and new tensor sizes reuse it
    (any recompile raises under error_on_recompile, which the fallback would report as a warning)."""
    _run(lambda ps: AdamW8bit(ps, compile=True), (4097,), 1)  # compile once
    assert compiled.available()
    shapes = [(4096 * 3 + 17,), (300, 29), (1000,), (8192,), (513,), (1 << 18, 3)]
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ps = [nn.Parameter(torch.randn(s)) for s in shapes]
        opt = AdamW8bit(ps, compile=True, lr=1e-3, min_8bit_size=0, chunk_size=1 << 16)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
            sched.step()
    assert compiled.available()


@pytest.mark.slow
def test_cli_compile_optim_follows_the_eager_run(tmp_path):
    """`leantrain train --optim adamw8bit --compile-optim` reaches the compiled kernel and tracks the eager run."""
    from leantrain.cli import main
    from leantrain.report import read_jsonl

    base = ["train", "--model", "tiny", "--method", "full", "--optim", "adamw8bit", "--train-size", "64",
            "--val-size", "32", "--max-length", "16", "--batch-size", "8", "--steps", "3", "--no-progress",
            "--model-dropout", "0"]
    assert main([*base, "--out", str(tmp_path / "eager")]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*base, "--compile-optim", "--out", str(tmp_path / "compiled")]) == 0
    assert not [w for w in caught if "compiled 8/4-bit Adam path is unavailable" in str(w.message)]
    eager = [r["loss"] for r in read_jsonl(tmp_path / "eager" / "metrics.jsonl") if "loss" in r]
    compiled = [r["loss"] for r in read_jsonl(tmp_path / "compiled" / "metrics.jsonl") if "loss" in r]
    assert len(eager) == len(compiled) == 3
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4
