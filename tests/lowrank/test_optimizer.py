"""KLSOptimizer: orthonormality, equivalence with dense SGD at full rank, rank adaptivity, state moves."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from leantrain.lowrank import KLSOptimizer, LowRankLinear, convert_to_lowrank, lowrank_layers


def _orth_err(q: torch.Tensor) -> float:
    return float((q.T @ q - torch.eye(q.shape[1], dtype=q.dtype)).norm())


def _mse_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    return closure


def _teacher(n=64, m=48, rank=5, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank, generator=g) @ torch.randn(rank, m, generator=g) / 3
    x = torch.randn(batch, m, generator=g)
    return a, x, x @ a.T


def test_rank5_teacher_from_rank32_finds_rank5_and_stays_orthonormal():
    """Fitting W* of rank 5 from rank 32 (plain SGD = the paper's integrator): τ-truncation settles at rank 5."""
    torch.manual_seed(0)
    a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 32, bias=False)
    opt = KLSOptimizer(layer, inner="sgd", lr=0.5, tau=0.05)
    closure = _mse_closure(opt, layer, x, y)
    ranks = []
    for _ in range(30):
        opt.step(closure)
        ranks.append(layer.rank)
        assert _orth_err(layer.U) < 1e-5 and _orth_err(layer.V) < 1e-5
    assert ranks[0] < 32, "rank never changed, so the rank-change path was not exercised"
    assert 5 <= layer.rank <= 6, ranks
    assert float((layer.weight_matrix() - a).norm() / a.norm()) < 0.05


def test_full_rank_kls_step_equals_dense_sgd_step():
    """At full rank span(Û) = Rⁿ and span(V̂) = Rᵐ, so Û Ŝ V̂ᵀ = Û Ûᵀ (W0 − λG) V̂ V̂ᵀ = W0 − λG exactly and τ=1e-12
    truncates nothing: the only error is rounding through QR/SVD, ≈ c·u·||W|| with u = 2⁻⁵³ (fp64). We allow
    1e-10·||W0||, far below the step itself (λ||G|| ≈ 1e-3·||G||), so a wrong or missing update fails."""
    torch.manual_seed(0)
    n, m, lr = 9, 12, 1e-3
    layer = LowRankLinear(m, n, 9, bias=True, max_rank=9, dtype=torch.float64)
    dense = nn.Linear(m, n, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.weight_matrix())
        dense.bias.copy_(layer.bias)
    x, y = torch.randn(16, m, dtype=torch.float64), torch.randn(16, n, dtype=torch.float64)
    for recompute in (False, True):
        lr_layer = copy.deepcopy(layer)
        opt = KLSOptimizer(lr_layer, inner="sgd", lr=lr, tau=1e-12, recompute_s=recompute)
        opt.step(_mse_closure(opt, lr_layer, x, y))
        ref = copy.deepcopy(dense)
        sgd = torch.optim.SGD(ref.parameters(), lr=lr)
        _mse_closure(sgd, ref, x, y)()
        sgd.step()
        step = (ref.weight - dense.weight).norm()
        assert step > 1e-6
        err = (lr_layer.weight_matrix() - ref.weight.detach()).norm()
        assert float(err) < 1e-10 * float(dense.weight.detach().norm()), (recompute, float(err))
        assert torch.allclose(lr_layer.bias, ref.bias, atol=1e-14)


def test_full_rank_momentum_state_is_moved_with_the_basis():
    """SGD momentum at full rank: every step rotates the bases (QR + SVD), so KLS equals dense momentum SGD over
    several steps only if the momentum buffer of S is carried into each new basis (positional state would not)."""
    torch.manual_seed(1)
    n, lr = 8, 1e-2
    layer = LowRankLinear(n, n, n, bias=False, max_rank=n, dtype=torch.float64)
    dense = nn.Linear(n, n, bias=False, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.weight_matrix())
    opt = KLSOptimizer(layer, inner="sgd", lr=lr, momentum=0.9, tau=1e-12)
    sgd = torch.optim.SGD(dense.parameters(), lr=lr, momentum=0.9)
    for i in range(5):
        x, y = torch.randn(16, n, dtype=torch.float64), torch.randn(16, n, dtype=torch.float64)
        opt.step(_mse_closure(opt, layer, x, y))
        sgd.step(_mse_closure(sgd, dense, x, y))
    assert float((layer.weight_matrix() - dense.weight.detach()).norm()) < 1e-10


def test_fixed_rank_mode_keeps_rank_and_orthonormality():
    torch.manual_seed(0)
    _a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 8, bias=False)
    opt = KLSOptimizer(layer, inner="sgd", lr=0.5, tau=None)
    closure = _mse_closure(opt, layer, x, y)
    first = float(closure().detach())
    for _ in range(20):
        opt.step(closure)
    assert layer.rank == 8 and _orth_err(layer.U) < 1e-5 and _orth_err(layer.V) < 1e-5
    assert float(closure().detach()) < 0.01 * first


def test_cached_and_recomputed_s_step_agree():
    """The single-pass S gradient (cached X, dY) equals the reference's extra forward/backward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3))
    convert_to_lowrank(model, ["0", "2"], rank=4, init="svd")
    x, y = torch.randn(32, 10), torch.randn(32, 3)
    out = []
    for recompute in (False, True):
        m = copy.deepcopy(model)
        opt = KLSOptimizer(m, inner="adam", lr=1e-2, tau=0.1, recompute_s=recompute)
        for _ in range(3):
            opt.step(_mse_closure(opt, m, x, y))
        out.append((m(x).detach(), opt.ranks()))
    assert out[0][1] == out[1][1]
    assert torch.allclose(out[0][0], out[1][0], atol=1e-4)


def _rank_change_pair():
    """Two copies after one identical K/L step; A keeps all 2r directions, B truncates hard (τ = 0.5)."""
    torch.manual_seed(0)
    _a, x, y = _teacher(n=40, m=30, rank=3, batch=128)
    layer = LowRankLinear(30, 40, 6, bias=False, max_rank=12, dtype=torch.float64)
    xs, ys = x.double(), y.double()
    runs = {}
    for name, tau in (("keep", 1e-12), ("cut", 0.5)):
        lay = copy.deepcopy(layer)
        if name == "keep":
            lay.min_rank = 12  # force keeping the whole augmented basis
        opt = KLSOptimizer(lay, inner="sgd", lr=0.05, momentum=0.9, tau=tau)
        opt.step(_mse_closure(opt, lay, xs, ys))
        runs[name] = (lay, opt)
    return runs


def test_state_rebuilt_after_rank_change_is_projection_of_full_state():
    """After a rank change the momentum of S (and K, L) must be the full-basis momentum projected onto the kept
    bases: U1 m_S V1ᵀ = P_U1 (Û m̂_S V̂ᵀ) P_V1 -- computed here from the copy that kept every direction."""
    runs = _rank_change_pair()
    keep, kopt = runs["keep"]
    cut, copt = runs["cut"]
    assert keep.rank == 12 and cut.rank < 6
    pu, pv = cut.U @ cut.U.T, cut.V @ cut.V.T
    m_keep = keep.U @ kopt.state[keep.S]["momentum_buffer"] @ keep.V.T
    m_cut = cut.U @ copt.state[cut.S]["momentum_buffer"] @ cut.V.T
    assert torch.allclose(m_cut, pu @ m_keep @ pv, atol=1e-10)
    # K's columns pair with V: the W-space K momentum is projected onto the new row space
    mk_keep = kopt.state[keep.K]["momentum_buffer"] @ keep.V.T
    mk_cut = copt.state[cut.K]["momentum_buffer"] @ cut.V.T
    assert torch.allclose(mk_cut, mk_keep @ pv, atol=1e-10)
    ml_keep = kopt.state[keep.L]["momentum_buffer"] @ keep.U.T
    ml_cut = copt.state[cut.L]["momentum_buffer"] @ cut.U.T
    assert torch.allclose(ml_cut, ml_keep @ pu, atol=1e-10)


def test_adam_state_shapes_follow_rank_and_training_continues():
    torch.manual_seed(0)
    _a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 32, bias=True)
    opt = KLSOptimizer(layer, inner="adam", lr=1e-2, tau=0.05)
    closure = _mse_closure(opt, layer, x, y)
    seen = set()
    for step in range(1, 8):
        opt.step(closure)
        r = layer.rank
        seen.add(r)
        st = opt.state
        assert tuple(st[layer.S]["exp_avg"].shape) == (r, r) and tuple(st[layer.S]["exp_avg_sq"].shape) == (r, r)
        assert tuple(st[layer.K]["exp_avg"].shape) == (64, r) and tuple(st[layer.L]["exp_avg_sq"].shape) == (48, r)
        assert (st[layer.S]["exp_avg_sq"] >= 0).all()
        assert int(st[layer.S]["step"]) == step and int(st[layer.K]["step"]) == step
        # the optimizer holds exactly the layer's current Parameter objects
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert {id(layer.K), id(layer.L), id(layer.S), id(layer.bias)} <= held
    assert len(seen) > 1


def test_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    _a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 32)
    opt = KLSOptimizer({"fc": layer}, inner="adamw", lr=1e-2, tau=0.05)
    for _ in range(3):
        opt.step(_mse_closure(opt, layer, x, y))
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain tensors and numbers only
    twin = copy.deepcopy(layer)
    opt2 = KLSOptimizer({"fc": twin}, inner="adamw", lr=1e-2, tau=0.05)
    opt2.load_state_dict(sd)
    for _ in range(2):
        opt.step(_mse_closure(opt, layer, x, y))
        opt2.step(_mse_closure(opt2, twin, x, y))
    assert layer.rank == twin.rank
    assert torch.allclose(layer.weight_matrix(), twin.weight_matrix(), atol=1e-6)


def test_optimizer_state_rejects_mismatched_ranks():
    torch.manual_seed(0)
    _a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 32)
    opt = KLSOptimizer({"fc": layer}, inner="sgd", lr=0.5, tau=0.05)
    opt.step(_mse_closure(opt, layer, x, y))
    fresh = LowRankLinear(48, 64, 32)
    with pytest.raises(ValueError, match="'fc' has rank 32"):
        KLSOptimizer({"fc": fresh}, inner="sgd", lr=0.5, tau=0.05).load_state_dict(opt.state_dict())


def test_whole_model_trains_other_params_and_works_with_lr_scheduler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    convert_to_lowrank(model, ["0"], rank=6)
    head_before = model[2].weight.detach().clone()
    opt = KLSOptimizer(model, inner="sgd", lr=0.1, tau=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    x, y = torch.randn(16, 10), torch.randn(16, 3)
    opt.step(_mse_closure(opt, model, x, y))
    sched.step()
    assert not torch.equal(model[2].weight, head_before)
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.05)
    assert set(opt.ranks()) == {"0"} and [n for n, _ in lowrank_layers(model)] == ["0"]


def test_bad_inputs_name_the_value():
    layer = LowRankLinear(8, 6, 3)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"tau={bad!r}"):
            KLSOptimizer(layer, inner="sgd", lr=0.1, tau=bad)
    with pytest.raises(ValueError, match="'rmsprop'"):
        KLSOptimizer(layer, inner="rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="lr=None"):
        KLSOptimizer(layer, inner="sgd")
    with pytest.raises(ValueError, match="no LowRankLinear"):
        KLSOptimizer(nn.Linear(3, 3), inner="sgd", lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        KLSOptimizer(layer, inner="sgd", lr=0.1).step()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"\.K"):
        KLSOptimizer(layer, inner=other)


def test_spec_quadratic_descent_recovers_rank3_target():
    """Spec 8.4: minimise 0.5||W − A||², A rank 3 (20×15), start rank 2 with S0 = diag(1, .5), λ = 0.5, τ = 1e-3,
    r_max = 7. G = W − A and the augmented space contains W0, so the error about halves per step while the basis
    captures A; after 20 steps the rank is exactly 3 and ||W − A||/||A|| < 1e-4."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 15, generator=g, dtype=torch.float64)
    layer = LowRankLinear(15, 20, 2, bias=False, max_rank=7, dtype=torch.float64)
    layer.S.data = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64))
    opt = KLSOptimizer(layer, inner="sgd", lr=0.5, tau=1e-3)
    eye = torch.eye(15, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((layer(eye) - a.T) ** 2).sum()  # layer(I) = Wᵀ, so dL/dW = W − A
        loss.backward()
        return loss

    ranks = []
    for _ in range(20):
        opt.step(closure)
        ranks.append(layer.rank)
    assert max(ranks) > 3 and ranks[-1] == 3, ranks
    assert float((layer.weight_matrix() - a).norm() / a.norm()) < 1e-4


def test_closure_that_drops_grads_skips_the_step_and_stale_params_lose_grads():
    """A loop's nan-policy 'skip' zeroes grads inside the closure: then W must not move (no S-step from the
    cached activations either), and Parameter objects swapped out by a rank change carry no stale gradient."""
    torch.manual_seed(0)
    _a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 16, bias=True)
    opt = KLSOptimizer(layer, inner="sgd", lr=0.5, tau=0.05)
    stale = list(layer.parameters())
    opt.step(_mse_closure(opt, layer, x, y))
    assert all(p.grad is None for p in stale if not any(p is q for q in layer.parameters()))
    w0, b0 = layer.weight_matrix().clone(), layer.bias.detach().clone()

    def skipping():
        loss = _mse_closure(opt, layer, x, y)()
        opt.zero_grad(set_to_none=True)
        return loss

    opt.step(skipping)
    assert torch.allclose(layer.weight_matrix(), w0, atol=1e-5) and torch.equal(layer.bias.detach(), b0)


def _kls_run(inner, steps=8, seed=0):
    """A rank-adapting KLS run (rank 32 -> ~5) over an inner optimizer factory; returns (layer, optimizer)."""
    torch.manual_seed(seed)
    _a, x, y = _teacher()
    layer = LowRankLinear(48, 64, 32, bias=True)
    opt = KLSOptimizer(layer, inner=inner, tau=0.05)
    for _ in range(steps):
        opt.step(_mse_closure(opt, layer, x, y))
    return layer, opt


def test_leantrain_adamw_inner_follows_torch_adamw_inner():
    """leantrain's optimizers keep moments flat (and maybe quantized), which the integrator's state transport
    could not see: their moments were never moved to the new bases (and were silently truncated or misread
    after a rank change). Now they are decoded, moved and re-encoded: the trajectory equals torch AdamW's."""
    from leantrain.optim import AdamW

    ref, ref_opt = _kls_run(lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    ours, opt = _kls_run(lambda groups: AdamW(groups, lr=1e-2, min_8bit_size=0))
    assert ref.rank == ours.rank < 32
    # float round-off only (measured 9e-5 after 8 steps; without the transport 0.03 after 2 steps, 0.12 after 8)
    assert (ref.weight_matrix() - ours.weight_matrix()).abs().max() < 1e-3
    for key in ("exp_avg", "exp_avg_sq"):
        want, got = ref_opt.state[ref.S][key], opt.inner.decoded_moments(ours.S)[key]
        assert got.shape == want.shape and (got - want).norm() <= 1e-3 * want.norm(), key


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "AdamW4bit"])
def test_quantized_inner_transports_and_resumes_exactly(cls_name):
    """8/4-bit inner states follow the rank changes (sizes match every factor) and a state_dict round trip
    between steps -- K and L are zero-size placeholders then -- continues bit-identically."""
    import leantrain.optim as lo

    make = lambda groups: getattr(lo, cls_name)(groups, lr=1e-2, min_8bit_size=0)
    layer, opt = _kls_run(make, steps=4)
    r = layer.rank
    assert opt.inner.stored_numel(layer.S) == r * r and opt.inner.stored_numel(layer.K) in (64 * r, 64 * r + 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(layer)
    opt2 = KLSOptimizer(twin, inner=make, tau=0.05)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _a, x, y = _teacher()
    for _ in range(3):
        opt.step(_mse_closure(opt, layer, x, y))
        opt2.step(_mse_closure(opt2, twin, x, y))
    assert layer.rank == twin.rank and torch.equal(layer.weight_matrix(), twin.weight_matrix())
