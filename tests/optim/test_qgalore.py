"""Q-GaLore's options of the GaLore family (leantrain/optim/qgalore.py): int8/int4 projector storage and lazy
refresh -- quantization error bound, the refresh skipped exactly when the measured cosine reaches the threshold,
bit-exact checkpoint/resume, and the options reaching the optimizer from ``--extra``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leantrain.checkpoint import join_state_dict, split_state_dict
from leantrain.config import TrainConfig
from leantrain.optim import build_optimizer
from leantrain.optim.adam import AdamW
from leantrain.optim.qgalore import dequantize, quantize


def _orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen))
    return q if rows >= cols else q.T.contiguous()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(8, 300), (300, 8), (1, 7)])
def test_quantized_basis_round_trip_within_half_a_step(bits, shape):
    """|P - dequant(P)| <= (max - min) / (2 (2^bits - 1)) per block of 256, computed here from P itself."""
    p = _orthonormal(*shape)
    enc = quantize(p, bits, 256)
    back = dequantize(enc, shape, bits, 256)
    flat, err = p.reshape(-1), (back - p).abs().reshape(-1)
    for start in range(0, flat.numel(), 256):
        blk = flat[start:start + 256]
        bound = float(blk.max() - blk.min()) / (2 * (2**bits - 1))
        assert float(err[start:start + 256].max()) <= bound * (1 + 1e-5) + 1e-7
    assert enc["proj_basis_codes"].dtype == torch.uint8
    assert enc["proj_basis_codes"].numel() == (p.numel() + 1) // 2 if bits == 4 else p.numel()


def _galore(params: list[nn.Parameter], **keys) -> AdamW:
    return AdamW([{"params": params, "rank": 2, "update_proj_gap": 2, "svd": "full", **keys}], lr=1e-2,
                 weight_decay=0.0)


def _grads(steps: int, noise: float, seed: int = 1) -> list[torch.Tensor]:
    """A fixed rank-2 gradient plus noise: small noise keeps the leading singular vector, large noise moves it."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 2, generator=gen) @ torch.randn(2, 24, generator=gen)
    return [base + noise * torch.randn(40, 24, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("noise,thr", [(0.05, 0.9), (3.0, 0.9), (3.0, 0.7)])
def test_lazy_refresh_stretches_the_gap_exactly_when_the_cosine_reaches_the_threshold(noise, thr):
    """k = 1: after each refresh, the layer's interval doubles iff |cos(previous lead vector, new lead vector)|
    -- recomputed here from the stored vectors -- is >= the threshold; refreshes happen exactly at proj_next."""
    p = nn.Parameter(torch.zeros(40, 24))
    opt = _galore([p], lazy_refresh_cos=thr, lazy_refresh_k=1)
    refreshes, decisions = [], []
    for step, g in enumerate(_grads(60, noise), start=1):
        st = opt.state.get(p, {})
        lead, gap, due = st.get("proj_lead"), st.get("proj_gap"), st.get("proj_next")
        count = st.get("proj_refreshes", 0)
        p.grad = g
        opt.step()
        st = opt.state[p]
        if st["proj_refreshes"] != count:
            refreshes.append(step)
            assert due is None or step == due
            if lead is not None:
                cos = float(torch.nn.functional.cosine_similarity(lead, st["proj_lead"], dim=0).abs())
                assert float(st["proj_cos"][-1]) == pytest.approx(cos, abs=1e-6)
                decisions.append(cos >= thr)
                assert st["proj_gap"] == (2 * gap if cos >= thr else gap)
        else:
            assert due is not None and step < due
    assert len(refreshes) >= 3
    if noise == 0.05:  # the subspace does not move: 1, 3, 7, 15, 31 (interval 2, 4, 8, 16, ...)
        assert refreshes[:5] == [1, 3, 7, 15, 31] and all(decisions)
    if (noise, thr) == (3.0, 0.9):  # it moves every time (measured cosines 0.06-0.81): every 2 steps
        assert refreshes == list(range(1, 61, 2)) and not any(decisions)
    if (noise, thr) == (3.0, 0.7):  # some measured cosines reach 0.7, some do not: both branches taken
        assert any(decisions) and not all(decisions)


def _roundtrip(state: dict, tmp_path) -> dict:
    tensors, tree = split_state_dict(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "opt.safetensors")
    return join_state_dict(load_file(tmp_path / "opt.safetensors"), json.loads(json.dumps(tree)))


@pytest.mark.parametrize("keys", [{"proj_bits": 4}, {"proj_bits": 8, "lazy_refresh_cos": 0.5, "lazy_refresh_k": 2},
                                  {"lazy_refresh_cos": 0.4}])
def test_checkpoint_resume_is_bit_exact(keys, tmp_path):
    grads = _grads(30, 0.6)
    p0 = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    a = nn.Parameter(p0.clone())
    opt = _galore([a], **keys)
    for g in grads:
        a.grad = g.clone()
        opt.step()
    b = nn.Parameter(p0.clone())
    first = _galore([b], **keys)
    for g in grads[:13]:
        b.grad = g.clone()
        first.step()
    saved = _roundtrip(first.state_dict(), tmp_path)
    second = _galore([b], **keys)
    second.load_state_dict(saved)
    for g in grads[13:]:
        b.grad = g.clone()
        second.step()
    assert torch.equal(a.detach(), b.detach())
    if "proj_bits" in keys:
        assert "proj_basis" not in opt.state[a] and opt.state[a]["proj_basis_codes"].dtype == torch.uint8


def test_quantized_projector_stays_close_to_the_float_one():
    """Same gradients, 30 steps: the int8 basis moves the weights like the float one (relative distance
    measured 0.0027; bound 0.02), int4 within 0.1 (measured 0.058)."""
    grads = _grads(30, 0.6)
    runs = {}
    for bits in (None, 8, 4):
        p = nn.Parameter(torch.zeros(40, 24))
        opt = _galore([p], **({} if bits is None else {"proj_bits": bits}))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs[bits] = p.detach()
    ref = runs[None]
    assert float((runs[8] - ref).norm() / ref.norm()) <= 0.02
    assert float((runs[4] - ref).norm() / ref.norm()) <= 0.1


def test_extra_options_reach_the_galore_groups_and_bad_values_are_refused():
    cfg = TrainConfig(optim="galore-adamw", rank=2, extra={"proj_bits": 4, "lazy_refresh_cos": 0.4})
    p = nn.Parameter(torch.zeros(40, 24))
    opt = build_optimizer("galore-adamw", [{"params": [p], "name": "linear"}], cfg, 1e-3)
    (group,) = opt.param_groups
    assert (group["proj_bits"], group["lazy_refresh_cos"]) == (4, 0.4)
    bad = TrainConfig(optim="galore-adamw", rank=2, extra={"proj_bits": 3})
    with pytest.raises(ValueError, match=r"proj_bits=3 must be 4, 8"):
        build_optimizer("galore-adamw", [{"params": [nn.Parameter(torch.zeros(40, 24))], "name": "linear"}], bad,
                        1e-3)
