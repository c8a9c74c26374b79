"""AdamW8bit / Adam8bit / AdamW4bit / AdamW: math vs torch, state_dict round trips, bad input, non-finite grads."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from leantrain.optim import Adam8bit, AdamW, AdamW4bit, AdamW8bit


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


P0 = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", [(4095,), (63, 65)])
def test_small_tensors_take_fp32_path_and_match_torch(shape):
    p0 = torch.randn(shape)
    grads = _grads(shape, 6)
    ours, opt = _run(lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1), p0, grads)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), p0, grads)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    st = next(iter(opt.state.values()))
    assert st["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in st


def test_fp32_adamw_matches_torch_on_large_tensor():
    grads = _grads(P0.shape, 8)
    ours, _ = _run(lambda ps: AdamW(ps, lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), P0, grads)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
                  P0, grads)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_adam8bit_l2_decay_matches_torch_adam_on_small_tensor():
    p0 = torch.randn(100)
    grads = _grads((100,), 5)
    ours, _ = _run(lambda ps: Adam8bit(ps, lr=1e-2, weight_decay=0.1), p0, grads)
    ref, _ = _run(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1), p0, grads)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls,ref_cls,tol", [(AdamW8bit, torch.optim.AdamW, 0.05), (Adam8bit, torch.optim.Adam, 0.05),
                                             (AdamW4bit, torch.optim.AdamW, 0.35)])
def test_quantized_close_to_fp32(cls, ref_cls, tol):
    """Spec check 3: ||p_q - p_32|| / ||p_32 - p0|| small after 10 steps with the same gradients."""
    grads = _grads(P0.shape, 10)
    ours, opt = _run(lambda ps: cls(ps, lr=1e-3), P0, grads)
    ref, _ = _run(lambda ps: ref_cls(ps, lr=1e-3), P0, grads)
    rel = ((ours - ref).norm() / (ref - P0).norm()).item()
    assert rel < tol
    st = next(iter(opt.state.values()))
    assert st["exp_avg_codes"].dtype == torch.uint8


def test_state_bytes_per_param():
    p = nn.Parameter(torch.zeros(1024, 1024))
    p.grad = torch.randn_like(p)
    for cls, limit in ((AdamW8bit, 2.05), (AdamW4bit, 1.05)):
        opt = cls([p])
        opt.step()
        assert opt.state_bytes() / p.numel() <= limit


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 1))


def _train(model, opt, steps, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 1, generator=g)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=g)
        y = x @ w
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mlp_trajectory_close_to_fp32_adamw():
    """8-bit AdamW (min_8bit_size lowered so every weight matrix is quantized) follows fp32 AdamW."""
    m8, m32 = _mlp(), _mlp()
    l8 = _train(m8, AdamW8bit(m8.parameters(), lr=3e-3, min_8bit_size=1024), 60)
    l32 = _train(m32, torch.optim.AdamW(m32.parameters(), lr=3e-3), 60)
    assert l32[-1] < 0.2 * l32[0]  # the task is learnable
    assert abs(sum(l8[-10:]) - sum(l32[-10:])) / sum(l32[-10:]) < 0.05
    for a, b in zip(m8.parameters(), m32.parameters()):
        assert ((a - b).norm() / b.norm()).item() < 0.05


def _roundtrip(opt_state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(opt_state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit, AdamW])
def test_state_dict_roundtrip_continues_identically(cls):
    """torchao-style smoke test: step, save, load into a fresh optimizer, then both continue bit-identically."""
    m1 = _mlp()
    o1 = cls(m1.parameters(), lr=1e-2, min_8bit_size=1024)
    _train(m1, o1, 3)
    sd = o1.state_dict()
    for st in sd["state"].values():  # only tensors and numbers: safetensors / weights_only friendly
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in st.values())
    m2 = _mlp()
    m2.load_state_dict(m1.state_dict())
    o2 = cls(m2.parameters(), lr=1e-2, min_8bit_size=1024)
    o2.load_state_dict(_roundtrip(sd))
    for k, v in o1.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(o2.state_dict()["state"][0][k]))
    l1 = _train(m1, o1, 3, seed=5)
    l2 = _train(m2, o2, 3, seed=5)
    assert l1 == l2
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_is_about_a_quarter_of_fp32():
    p = nn.Parameter(torch.randn(512, 512))
    sizes = {}
    for name, opt in (("8bit", AdamW8bit([p])), ("fp32", torch.optim.AdamW([p]))):
        p.grad = torch.randn_like(p)
        opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        sizes[name] = buf.tell()
    assert 0.24 < sizes["8bit"] / sizes["fp32"] < 0.27


def test_load_mismatched_shapes_names_param_and_shapes():
    a = [nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(4096, 4))]
    oa = AdamW8bit(a)
    for p in a:
        p.grad = torch.randn_like(p)
    oa.step()
    b = [nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(4096, 8))]
    ob = AdamW8bit(b)
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(4096, 8\).*\(16384,\).*\(32768,\)"):
        ob.load_state_dict(oa.state_dict())
    c = [nn.Parameter(torch.randn(11)), nn.Parameter(torch.randn(4096, 4))]
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(11,\).*\(10,\)"):
        AdamW8bit(c).load_state_dict(oa.state_dict())
    sd = oa.state_dict()
    del sd["state"][1]["exp_avg_sq_codes"]
    with pytest.raises(KeyError, match="parameter 1 .*exp_avg_sq_codes"):
        AdamW8bit([nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(4096, 4))]).load_state_dict(sd)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1e-3}, "lr=-0.001"),
    ({"betas": (0.9, 1.0)}, "beta parameter at index 1: 1.0"),
    ({"betas": (-0.1, 0.9)}, "index 0"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"block_size": 0}, "block_size=0"),
    ({"block_size": 255}, "block_size=255"),
    ({"codec": "int3"}, "codec='int3'"),
    ({"percentile_clipping": 0}, "percentile_clipping=0"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_group_override():
    opt = AdamW8bit([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="optim_bits=7"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "optim_bits": 7})


def test_nonfinite_gradient_raises_with_index_and_step():
    ps = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(5000))]
    opt = AdamW8bit(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    ps[1].grad[7] = float("nan")
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match="parameter 1 .*not finite at step 2"):
        opt.step()
    assert torch.equal(ps[0], before)  # checked before anything is updated
    ps[1].grad[7] = float("inf")
    with pytest.raises(ValueError, match="parameter 1"):
        opt.step()


def test_skip_nonfinite_counts_and_leaves_state():
    p = nn.Parameter(torch.zeros(5000))
    opt = AdamW8bit([{"params": [p], "skip_nonfinite": True}])
    p.grad = torch.ones_like(p)
    opt.step()
    snap = {k: v.clone() for k, v in opt.state[p].items()}
    pv = p.detach().clone()
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.nonfinite_skips == 1 and torch.equal(p, pv)
    assert all(torch.equal(snap[k], v) for k, v in opt.state[p].items())


def test_huge_finite_gradient_is_not_flagged():
    p = nn.Parameter(torch.zeros(8))
    p.grad = torch.full((8,), 3e38)  # the sum overflows, the values do not
    AdamW8bit([p]).step()
    assert torch.isfinite(p).all()


def test_group_override_keeps_32bit_state():
    emb, lin = nn.Parameter(torch.randn(5000)), nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([{"params": [emb], "optim_bits": 32}, {"params": [lin]}, ])
    opt.add_param_group({"params": [nn.Parameter(torch.randn(5000))], "codec": "bf16"})
    for p in [emb, lin, *opt.param_groups[2]["params"]]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[emb]["exp_avg"].dtype == torch.float32
    assert opt.state[lin]["exp_avg_codes"].dtype == torch.uint8
    assert opt.state[opt.param_groups[2]["params"][0]]["exp_avg"].dtype == torch.bfloat16


def test_bf16_and_noncontiguous_params():
    p = nn.Parameter(torch.randn(64, 128).to(torch.bfloat16))
    q = nn.Parameter(torch.randn(128, 64).t())  # non-contiguous fp32
    opt = AdamW8bit([p, q], lr=1e-2, min_8bit_size=0)
    p0, q0 = p.detach().clone(), q.detach().clone()
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, p0)
    assert torch.allclose(q, q0 * (1 - 1e-2 * 1e-2) - 1e-2, atol=1e-5)  # first Adam step = -lr * sign(g)


def test_percentile_clipping_scales_gradient():
    """Spec check 4: norms 1,1,1,1,1 then 10 with percentile 5 -> that step's gradient is scaled by 1/10."""
    p = nn.Parameter(torch.zeros(100))
    opt = AdamW(p.new_empty(0).new_tensor([]).new_empty(0).numel() and [] or [p], lr=1.0, weight_decay=0.0,
                percentile_clipping=5)
    scales = []
    for norm in [1, 1, 1, 1, 1, 10]:
        g = torch.zeros(100)
        g[0] = norm
        scales.append(opt._gnorm_scale(g, opt.state[p], opt.param_groups[0], len(scales) + 1))
    assert scales[:5] == [1.0] * 5 and math.isclose(scales[5], 0.1, rel_tol=1e-6)


def test_closure_and_zero_lr():
    p = nn.Parameter(torch.randn(10))
    opt = AdamW8bit([p], lr=0.0)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    p0 = p.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and torch.equal(p, p0)


@pytest.mark.peer
def test_against_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    grads = [g * 1e-2 for g in _grads(P0.shape, 10)]
    ours, _ = _run(lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=1e-2), P0, grads)
    theirs, opt = _run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3, weight_decay=1e-2), P0, grads)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2), P0, grads)
    assert opt.state[next(iter(opt.state))]["state1"].dtype == torch.uint8  # bnb really ran 8-bit on CPU
    rel = ((ours - theirs).norm() / (theirs - P0).norm()).item()
    assert rel < 0.01, rel
    assert (ours - ref).norm() <= 1.5 * (theirs - ref).norm() + 1e-7  # not further from fp32 than bnb


@pytest.mark.peer
@pytest.mark.slow
def test_against_torchao_adamw8bit():
    pytest.importorskip("torchao")
    from torchao.optim import AdamW8bit as AoAdamW8bit

    grads = [g * 1e-2 for g in _grads(P0.shape, 5)]
    ours, _ = _run(lambda ps: AdamW8bit(ps, lr=1e-3), P0, grads)
    theirs, _ = _run(lambda ps: AoAdamW8bit(ps, lr=1e-3), P0, grads)
    assert ((ours - theirs).norm() / (theirs - P0).norm()).item() < 0.02


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit])
def test_chunking_does_not_change_results(cls):
    """The chunked loop is an implementation detail: small and huge chunks give bit-identical trajectories."""
    p0 = torch.randn(5000)
    grads = _grads((5000,), 4)
    small, _ = _run(lambda ps: cls(ps, lr=1e-2, chunk_size=512, block_size=128), p0, grads)
    big, _ = _run(lambda ps: cls(ps, lr=1e-2, chunk_size=1 << 20, block_size=128), p0, grads)
    assert torch.equal(small, big)
