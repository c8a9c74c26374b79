"""Projector math: shapes, orthonormality, best rank-r approximation, randomized quality, seeding, refresh
schedule, SVD-failure fallbacks, bad input, plain-tensor state."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from leantrain.optim import projector as pj


def _group(**kw):
    return {"rank": 8, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "svd": "full", **kw}


def _decaying(m: int, n: int, decay: float = 0.8, seed: int = 0) -> torch.Tensor:
    """m x n matrix with singular values decay**i and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape,basis_shape,low_shape", [((64, 32), (8, 32), (64, 8)), ((32, 64), (32, 8), (8, 64))])
@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_shapes_follow_the_smaller_side(shape, basis_shape, low_shape, svd):
    grad = torch.randn(shape)
    state: dict = {}
    group = _group(svd=svd)
    low = pj.project(grad, state, group, step=1)
    assert tuple(state["proj_basis"].shape) == basis_shape
    assert tuple(low.shape) == low_shape == pj.low_rank_shape(shape, group)
    assert pj.projector_numel(shape, group) == state["proj_basis"].numel()
    assert tuple(pj.project_back(low, state, group).shape) == shape


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("svd", ["full", "randomized"])
def test_basis_is_orthonormal(proj_type, svd):
    grad = torch.randn(96, 60)  # large enough for the randomized path (2 * (8 + 8) < 60)
    state: dict = {}
    pj.project(grad, state, _group(proj_type=proj_type, svd=svd), step=1)
    p = state["proj_basis"].double()
    gram = p @ p.T if state["proj_side"] == pj.RIGHT else p.T @ p
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_full_svd_projection_is_best_rank_r_approximation(shape):
    grad = torch.randn(shape)
    state: dict = {}
    group = _group(rank=6, scale=0.5)
    back = pj.project_back(pj.project(grad, state, group, step=1), state, group) / 0.5
    # Eckart-Young reference from numpy's SVD in float64.
    u, s, vt = np.linalg.svd(grad.double().numpy(), full_matrices=False)
    best = torch.from_numpy((u[:, :6] * s[:6]) @ vt[:6])
    torch.testing.assert_close(back.double(), best, atol=1e-4, rtol=0)


@pytest.mark.parametrize("proj_type", ["std", "left", "right", "full"])
def test_lossless_on_low_rank_gradient(proj_type):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(64, 5, generator=g) @ torch.randn(5, 32, generator=g)  # rank 5 <= r
    state: dict = {}
    group = _group(proj_type=proj_type, scale=0.25)
    back = pj.project_back(pj.project(grad, state, group, step=1), state, group)
    torch.testing.assert_close(back / 0.25, grad, atol=1e-4, rtol=1e-5)


def test_randomized_captures_nearly_the_exact_energy():
    grad = _decaying(300, 200, decay=0.97, seed=3)
    exact, _ = pj.compute_basis(grad, 20, pj.RIGHT, svd="full")
    rand, _ = pj.compute_basis(grad, 20, pj.RIGHT, svd="randomized", seed=7)
    e_exact = pj.captured_energy(grad, exact, pj.RIGHT)
    e_rand = pj.captured_energy(grad, rand, pj.RIGHT)
    assert e_exact > 0.5  # a meaningful subspace, not everything
    assert e_rand >= 0.99 * e_exact
    assert e_rand <= e_exact + 1e-5  # nothing beats the top-r subspace


def test_randomized_on_a_small_matrix_is_the_exact_svd():
    grad = torch.randn(40, 30)  # 2 * (8 + 8) >= 30: the sketch would be as large as the matrix
    exact, _ = pj.compute_basis(grad, 8, pj.RIGHT, svd="full")
    rand, _ = pj.compute_basis(grad, 8, pj.RIGHT, svd="randomized", seed=4)
    assert torch.equal(rand, exact)


def test_randomized_is_deterministic_given_the_seed():
    grad = torch.randn(160, 100)
    a, _ = pj.compute_basis(grad, 8, pj.RIGHT, svd="randomized", seed=11)
    b, _ = pj.compute_basis(grad.clone(), 8, pj.RIGHT, svd="randomized", seed=11)
    c, _ = pj.compute_basis(grad, 8, pj.RIGHT, svd="randomized", seed=12, power_iters=0)
    torch.manual_seed(123)  # the global RNG must not matter
    d, _ = pj.compute_basis(grad, 8, pj.RIGHT, svd="randomized", seed=11)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_project_uses_group_seed_and_step_deterministically():
    grad = torch.randn(120, 80)
    s1, s2, s3 = {}, {}, {}
    pj.project(grad, s1, _group(svd="randomized", seed=5, power_iters=0), step=1)
    pj.project(grad, s2, _group(svd="randomized", seed=5, power_iters=0), step=1)
    pj.project(grad, s3, _group(svd="randomized", seed=6, power_iters=0), step=1)
    assert torch.equal(s1["proj_basis"], s2["proj_basis"])
    assert not torch.equal(s1["proj_basis"], s3["proj_basis"])


def test_refresh_schedule_matches_galore():
    gap = 5
    state: dict = {}
    group = _group(update_proj_gap=gap, svd="randomized")
    refreshed_at = []
    for step in range(1, 2 * gap + 2):
        before = state.get("proj_refreshes", 0)
        pj.project(torch.randn(20, 12), state, group, step)
        if state["proj_refreshes"] > before:
            refreshed_at.append(step)
    assert refreshed_at == [1, gap + 1, 2 * gap + 1]


def test_rank_larger_than_matrix_is_clamped():
    grad = torch.randn(10, 6)
    state: dict = {}
    group = _group(rank=32)
    low = pj.project(grad, state, group, step=1)
    assert tuple(low.shape) == (10, 6) == pj.low_rank_shape((10, 6), group)
    torch.testing.assert_close(pj.project_back(low, state, group) / 0.25, grad, atol=1e-5, rtol=1e-5)


def test_project_back_add_equals_project_back():
    for shape in [(30, 20), (20, 30)]:
        for proj_type in ["std", "full"]:
            grad, upd_full = torch.randn(shape), torch.randn(shape)
            state: dict = {}
            group = _group(proj_type=proj_type)
            low = pj.project(grad, state, group, step=1)
            upd = pj.project_with(upd_full, state["proj_basis"], state["proj_side"], state.get("proj_basis_right"))
            assert upd.shape == low.shape
            p = torch.randn(shape)
            expected = p - 0.1 * pj.project_back(upd, state, group)
            torch.testing.assert_close(pj.project_back_add_(p.clone(), upd, state, group, alpha=-0.1), expected)


def test_rotate_first_moment_is_exact_change_of_basis():
    grad1, grad2 = torch.randn(40, 24), torch.randn(40, 24)
    state: dict = {}
    group = _group(rank=6, update_proj_gap=1, refresh_moments="reproject")
    m = pj.project(grad1, state, group, step=1)
    old = state["proj_basis"].clone()
    assert "proj_rotation" not in state  # nothing to rotate on the first refresh
    pj.project(grad2, state, group, step=2)
    new = state["proj_basis"]
    m_new, _ = pj.rotate_moments(m, None, state["proj_rotation"], pj.RIGHT)
    # m_new are the new coordinates of the full-space momentum m @ P_old, i.e. its projection on the new basis.
    torch.testing.assert_close(m_new, (m @ old) @ new.T, atol=1e-5, rtol=1e-5)


def test_rotate_second_moment_is_exact_for_signed_permutation():
    v = torch.rand(10, 4)
    perm = torch.eye(4)[[2, 0, 3, 1]] * torch.tensor([1.0, -1.0, 1.0, -1.0])
    _, v_new = pj.rotate_moments(torch.zeros(10, 4), v, perm, pj.RIGHT)
    torch.testing.assert_close(v_new, v @ perm.abs())
    _, v_left = pj.rotate_moments(torch.zeros(4, 10), v.T.contiguous(), perm.T.contiguous(), pj.LEFT)
    torch.testing.assert_close(v_left, perm.T.abs() @ v.T)
    assert (v_new >= 0).all()


def _failing_svd(real, fail_shapes, fail_dtypes):
    def svd(a, *args, **kw):
        if tuple(a.shape) in fail_shapes and a.dtype in fail_dtypes:
            raise torch.linalg.LinAlgError("The algorithm failed to converge (injected)")
        return real(a, *args, **kw)
    return svd


def test_svd_failure_retries_in_float64(monkeypatch):
    grad = torch.randn(30, 20)
    monkeypatch.setattr(torch.linalg, "svd", _failing_svd(torch.linalg.svd, {(30, 20)}, {torch.float32}))
    with pytest.warns(RuntimeWarning, match=r"\(30, 20\).*float64"):
        basis, _ = pj.compute_basis(grad, 4, pj.RIGHT, svd="full")
    vh = torch.from_numpy(np.linalg.svd(grad.double().numpy())[2][:4]).float()
    torch.testing.assert_close((basis.T @ basis), (vh.T @ vh), atol=1e-4, rtol=0)  # same subspace


def test_svd_failure_falls_back_to_randomized(monkeypatch):
    grad = _decaying(30, 20, decay=0.5)
    monkeypatch.setattr(torch.linalg, "svd",
                        _failing_svd(torch.linalg.svd, {(30, 20)}, {torch.float32, torch.float64}))
    with pytest.warns(RuntimeWarning) as record:
        basis, _ = pj.compute_basis(grad, 4, pj.RIGHT, svd="full")
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and all("(30, 20)" in m for m in messages)
    assert "float64" in messages[0] and "jitter" in messages[1] and "randomized" in messages[2]
    s = np.linalg.svd(grad.double().numpy(), compute_uv=False)
    exact = float((s[:4] ** 2).sum() / (s**2).sum())
    assert pj.captured_energy(grad, basis, pj.RIGHT) >= 0.999 * exact


def test_non_finite_gradient():
    bad = torch.randn(20, 10)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\(20, 10\)"):
        pj.project(bad, {}, _group(), step=1)
    state: dict = {}
    pj.project(torch.randn(20, 10), state, _group(update_proj_gap=1), step=1)
    old = state["proj_basis"].clone()
    with pytest.warns(RuntimeWarning, match="keeping the previous basis"):
        pj.project(bad, state, _group(update_proj_gap=1), step=2)
    assert torch.equal(state["proj_basis"], old)


@pytest.mark.parametrize("key,value,match", [
    ("rank", 0, "rank=0"), ("rank", -3, "rank=-3"), ("rank", 2.5, "rank=2.5"),
    ("proj_type", "diag", "proj_type='diag'"), ("svd", "fast", "svd='fast'"),
    ("update_proj_gap", 0, "update_proj_gap=0"), ("refresh_moments", "reset", "refresh_moments='reset'"),
    ("scale", float("nan"), "scale=nan"),
])
def test_bad_group_names_the_value(key, value, match):
    with pytest.raises(ValueError, match=match):
        pj.check_group(_group(**{key: value}))


def test_bad_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"\(7,\)"):
        pj.project(torch.randn(7), {}, _group(), step=1)
    with pytest.raises(ValueError, match="proj_type='diag'"):
        pj.projection_side((4, 5), "diag")


def test_state_is_plain_tensors_and_round_trips():
    from safetensors.torch import load, save

    state: dict = {}
    group = _group(proj_type="full")
    pj.project(torch.randn(20, 12), state, group, step=1)
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    back = load(save(tensors))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for k, v in tensors.items():
        assert torch.equal(back[k], v) and torch.equal(loaded[k], v)
    grad = torch.randn(20, 12)
    torch.testing.assert_close(pj.project(grad, loaded, group, step=2), pj.project(grad, state, group, step=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_randomized_same_on_cpu_and_cuda():
    grad = torch.randn(64, 40)
    a, _ = pj.compute_basis(grad, 8, pj.RIGHT, svd="randomized", seed=3)
    b, _ = pj.compute_basis(grad.cuda(), 8, pj.RIGHT, svd="randomized", seed=3)
    torch.testing.assert_close(a.T @ a, (b.T @ b).cpu(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k,n,rank", [(40, 300, 10), (64, 500, 64), (30, 90, 25)])
def test_top_singular_of_wide_matches_lapack_svd(k: int, n: int, rank: int) -> None:
    """The Gram/eigh route of the randomized refresh against LAPACK's SVD, on a decaying and rank-deficient
    spectrum (a gradient has rank <= tokens per step)."""
    from leantrain.optim.projector import top_singular_of_wide

    gen = torch.Generator().manual_seed(k + n)
    u0 = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    sv = torch.logspace(0, -3, k, dtype=torch.float64)
    sv[2 * k // 3:] = 0.0
    b = ((u0 * sv) @ v0.mT).float()
    u, s, vh = top_singular_of_wide(b, rank)
    ref_u, ref_s, ref_vh = torch.linalg.svd(b.double(), full_matrices=False)
    torch.testing.assert_close(s, ref_s[:rank], rtol=0, atol=1e-6)
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.mT, eye, rtol=0, atol=1e-10)
    kept = int((ref_s[:rank] > 1e-6).sum())  # directions with a nonzero singular value are unique up to sign
    torch.testing.assert_close(u[:, :kept] @ u[:, :kept].mT, ref_u[:, :kept] @ ref_u[:, :kept].mT, rtol=0, atol=1e-6)
    torch.testing.assert_close(vh[:kept].mT @ vh[:kept], ref_vh[:kept].mT @ ref_vh[:kept], rtol=0, atol=1e-6)
    torch.testing.assert_close((u * s) @ vh, (ref_u[:, :rank] * ref_s[:rank]) @ ref_vh[:rank], rtol=0, atol=1e-6)
