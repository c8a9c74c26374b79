"""Lion8bit and SGD8bit: exact on the fp32 path, close on the 8-bit path, bnb differential, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain.optim import Lion8bit, SGD8bit

P0 = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))


def _grads(shape, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(make, p0, grads):
    p = nn.Parameter(p0.clone())
    opt = make([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def _lion_reference(p0, grads, lr, betas, wd):
    """Lion, Chen et al. 2023, Algorithm 2 (decoupled weight decay)."""
    p, m = p0.clone(), torch.zeros_like(p0)
    for g in grads:
        u = torch.sign(betas[0] * m + (1 - betas[0]) * g)
        p = p * (1 - lr * wd) - lr * u
        m = betas[1] * m + (1 - betas[1]) * g
    return p


def test_lion_fp32_path_matches_reference():
    grads = _grads(P0.shape, 8)
    ours, _ = _run(lambda ps: Lion8bit(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, codec="fp32"), P0, grads)
    ref = _lion_reference(P0, grads, 1e-3, (0.9, 0.99), 0.1)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_lion_8bit_close_to_reference():
    grads = _grads(P0.shape, 10)
    ours, opt = _run(lambda ps: Lion8bit(ps, lr=1e-3), P0, grads)
    ref = _lion_reference(P0, grads, 1e-3, (0.9, 0.99), 0.0)
    assert opt.state[next(iter(opt.state))]["exp_avg_codes"].dtype == torch.uint8
    # sign updates: only elements whose b1*m + (1-b1)*g is near 0 can flip; the trajectory stays close
    assert ((ours - ref).norm() / (ref - P0).norm()).item() < 0.05
    assert opt.state_bytes() / P0.numel() < 1.05


@pytest.mark.parametrize("kw", [{"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01},
                                {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}])
def test_sgd_small_tensor_matches_torch(kw):
    p0 = torch.randn(1000)
    grads = _grads((1000,), 6)
    ours, _ = _run(lambda ps: SGD8bit(ps, lr=0.05, **kw), p0, grads)
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.05, **kw), p0, grads)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_sgd_8bit_close_to_torch():
    grads = _grads(P0.shape, 10)
    ours, opt = _run(lambda ps: SGD8bit(ps, lr=0.01, momentum=0.9), P0, grads)
    ref, _ = _run(lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9), P0, grads)
    assert opt.state[next(iter(opt.state))]["momentum_buffer_codes"].dtype == torch.uint8
    assert ((ours - ref).norm() / (ref - P0).norm()).item() < 0.03


@pytest.mark.parametrize("cls", [Lion8bit, SGD8bit])
def test_state_dict_roundtrip(cls):
    grads = _grads(P0.shape, 6)
    a = nn.Parameter(P0.clone())
    oa = cls([a], lr=1e-3)
    for g in grads[:3]:
        a.grad = g.clone()
        oa.step()
    b = nn.Parameter(a.detach().clone())
    ob = cls([b], lr=1e-3)
    ob.load_state_dict(oa.state_dict())
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


def test_bad_input():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="momentum=0.0"):
        SGD8bit(p, momentum=0.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGD8bit(p, momentum=0.9, nesterov=True, dampening=0.1)
    with pytest.raises(ValueError, match="lr=-1"):
        SGD8bit(p, lr=-1)
    with pytest.raises(ValueError, match="index 1: 1.5"):
        Lion8bit(p, betas=(0.9, 1.5))
    q = nn.Parameter(torch.zeros(3))
    q.grad = torch.tensor([0.0, float("inf"), 0.0])
    with pytest.raises(ValueError, match="parameter 0"):
        Lion8bit([q]).step()


@pytest.mark.peer
def test_against_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    grads = [g * 1e-2 for g in _grads(P0.shape, 10)]
    for ours_make, bnb_make in [
        (lambda ps: Lion8bit(ps, lr=1e-3, betas=(0.9, 0.99)), lambda ps: bnb.optim.Lion8bit(ps, lr=1e-3)),
        (lambda ps: SGD8bit(ps, lr=0.01, momentum=0.9), lambda ps: bnb.optim.SGD8bit(ps, lr=0.01, momentum=0.9)),
    ]:
        ours, _ = _run(ours_make, P0, grads)
        theirs, _ = _run(bnb_make, P0, grads)
        assert ((ours - theirs).norm() / (theirs - P0).norm()).item() < 0.05
