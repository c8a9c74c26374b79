"""Numeric checks of the KLS building blocks against the formulas of the DLRT spec (Section 8)."""
from __future__ import annotations

import pytest
import torch

from leantrain.lowrank import LowRankConv2d, LowRankLinear, augment, orthonormal, transport, truncation_rank


def _qr(n: int, r: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].to(dtype)


def test_augmentation_is_exact():
    """Spec 8.1: Û S̃ V̂ᵀ == U0 S0 V0ᵀ because U0 ∈ span(Û), V0 ∈ span(V̂)."""
    g = torch.Generator().manual_seed(0)
    u0, v0 = _qr(50, 4, g), _qr(30, 4, g)
    s0 = torch.randn(4, 4, generator=g)
    k1, l1 = torch.randn(50, 4, generator=g), torch.randn(30, 4, generator=g)
    u_hat, v_hat = augment(u0, k1), augment(v0, l1)
    assert u_hat.shape == (50, 8) and v_hat.shape == (30, 8)
    s_tilde = (u_hat.T @ u0) @ s0 @ (v_hat.T @ v0).T
    w0 = u0 @ s0 @ v0.T
    assert float((u_hat @ s_tilde @ v_hat.T - w0).norm() / w0.norm()) < 1e-5
    assert float((u_hat.T @ u_hat - torch.eye(8)).norm()) < 1e-5
    # Sign-fixed QR keeps the old basis as the first block, so state/padding maps are [I; 0].
    assert torch.allclose(u_hat[:, :4], u0, atol=1e-5)


def test_augmentation_rank_deficient_stays_orthonormal():
    """Spec pitfall 7: K1 ∈ span(U0) makes [U0 | K1] rank-deficient; Û stays orthonormal and holds U0 -- and gets
    no directions made of rounding (a Householder QR would pad with 5 such columns)."""
    g = torch.Generator().manual_seed(1)
    u0 = _qr(40, 5, g)
    u_hat = augment(u0, u0 @ torch.randn(5, 5, generator=g))
    assert u_hat.shape == (40, 5)
    assert float((u_hat.T @ u_hat - torch.eye(5)).norm()) < 1e-5
    assert float((u_hat @ (u_hat.T @ u0) - u0).norm()) < 1e-5


def test_augmentation_keeps_only_the_step_directions():
    """K1 = U0 S0 + a rank-2 step: Û = [U0 | 2 directions], and those span exactly the step's part outside U0.
    One-ulp changes of K1 (what 2 processes vs 1 produce) move Û by rounding only, not by O(1)."""
    g = torch.Generator().manual_seed(2)
    u0 = _qr(32, 8, g)
    step = 1e-3 * torch.randn(32, 2, generator=g) @ torch.randn(2, 8, generator=g)
    k1 = u0 @ torch.diag(torch.linspace(1.0, 0.2, 8)) + step
    u_hat = augment(u0, k1)
    assert u_hat.shape == (32, 10)
    assert float((u_hat.T @ u_hat - torch.eye(10)).norm()) < 1e-5
    outside = (torch.eye(32) - u0 @ u0.T) @ step
    assert float((outside - u_hat @ (u_hat.T @ outside)).norm() / outside.norm()) < 1e-4
    nudged = k1.clone()
    nudged.view(-1)[::7] = torch.nextafter(nudged.view(-1)[::7], torch.tensor(2.0))  # one ulp up in 1/7 of K1
    assert float((augment(u0, nudged) - u_hat).abs().max()) < 1e-3


@pytest.mark.parametrize("tau, expected", [(0.05, 3), (0.5, 2)])
def test_truncation_rule_spec_example(tau, expected):
    """Spec 8.3: σ = [3, 2, 1, .1, .01, .001]; ϑ = τ·||σ||; r = smallest j with ||σ[j:]|| < ϑ."""
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.1, 0.01, 0.001])
    assert truncation_rank(sigma, tau) == expected


def test_truncation_absolute_and_bad_tau():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.1, 0.01, 0.001])
    assert truncation_rank(sigma, 0.2, absolute=True) == 3  # ||σ[3:]|| = 0.1005 < 0.2 <= ||σ[2:]||
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match=f"tau={bad!r}"):
            truncation_rank(sigma, bad)


def _linear(n: int, m: int, r: int, dtype=torch.float64) -> LowRankLinear:
    torch.manual_seed(0)
    layer = LowRankLinear(m, n, r, bias=False, dtype=dtype)
    layer.S.data = torch.randn(r, r, dtype=dtype)
    return layer


def test_kl_mode_gives_both_projected_gradients_and_true_input_grad():
    """Spec 8.2: one 'kl' pass gives ∇K = G V0 and ∇L = Gᵀ U0 with G = dYᵀ X; dX is that of W0 (not doubled)."""
    layer = _linear(12, 9, 3)
    x = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 12, dtype=torch.float64)
    w0 = layer.weight_matrix()
    layer.K.data, layer.L.data = layer.U @ layer.S.detach(), layer.V @ layer.S.detach().T
    layer.mode = "kl"
    y = layer(x)
    assert torch.allclose(y, x @ w0.T, atol=1e-12)
    (0.5 * ((y - target) ** 2).sum()).backward()
    g = (x.detach() @ w0.T - target).T @ x.detach()  # dL/dW for loss 0.5||X Wᵀ − Y||²
    assert torch.allclose(layer.K.grad, g @ layer.V, atol=1e-10)
    assert torch.allclose(layer.L.grad, g.T @ layer.U, atol=1e-10)
    assert torch.allclose(x.grad, (x.detach() @ w0.T - target) @ w0, atol=1e-10)


def test_cached_s_gradient_equals_projection():
    """∇S = Ûᵀ G V̂ from cached X, dY equals the autograd S-gradient in the augmented basis."""
    layer = _linear(12, 9, 3)
    x, target = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    w0 = layer.weight_matrix()
    g = (x @ w0.T - target).T @ x
    g_ = torch.Generator().manual_seed(3)
    u_hat = augment(layer.U, torch.randn(12, 3, generator=g_, dtype=torch.float64))
    v_hat = augment(layer.V, torch.randn(9, 3, generator=g_, dtype=torch.float64))
    dy = x @ w0.T - target
    assert torch.allclose(layer.project_grad(x, dy, u_hat, v_hat), u_hat.T @ g @ v_hat, atol=1e-10)
    # autograd in 's' mode on the augmented basis at the same point W0
    layer.U, layer.V = u_hat, v_hat
    layer.S.data = (u_hat.T @ w0 @ v_hat).clone()
    (0.5 * ((layer(x) - target) ** 2).sum()).backward()
    assert torch.allclose(layer.S.grad, u_hat.T @ g @ v_hat, atol=1e-10)


def test_conv_forward_and_projected_grad_match_dense_conv():
    torch.manual_seed(0)
    conv = LowRankConv2d(3, 6, 3, rank=4, padding=1, dtype=torch.float64)
    w = conv.weight_matrix().reshape(6, 3, 3, 3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    dense = torch.nn.functional.conv2d(x, w, conv.bias.detach(), padding=1)
    assert torch.allclose(conv(x), dense, atol=1e-12)
    wd = w.clone().requires_grad_(True)
    out = torch.nn.functional.conv2d(x, wd, None, padding=1)
    dy = torch.randn_like(out)
    out.backward(dy)
    g = wd.grad.reshape(6, 27)
    assert torch.allclose(conv.project_grad(x, dy, conv.U, conv.V), conv.U.T @ g @ conv.V, atol=1e-10)
    conv.K.data, conv.L.data = conv.U @ conv.S.detach(), conv.V @ conv.S.detach().T
    conv.mode = "kl"
    assert torch.allclose(conv(x), dense, atol=1e-12)


def test_transport_first_moment_is_projection_and_second_moment_stays_nonnegative():
    g = torch.Generator().manual_seed(0)
    u0, v0 = _qr(10, 3, g, torch.float64), _qr(8, 3, g, torch.float64)
    u1, v1 = _qr(10, 4, g, torch.float64), _qr(8, 2, g, torch.float64)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    moved = transport(m, u1.T @ u0, v1.T @ v0)
    # W-space direction U1 m' V1ᵀ is the projection of U0 m V0ᵀ onto span(U1) × span(V1)
    expect = (u1 @ u1.T) @ (u0 @ m @ v0.T) @ (v1 @ v1.T)
    assert torch.allclose(u1 @ moved @ v1.T, expect, atol=1e-12)
    v = torch.rand(3, 3, generator=g, dtype=torch.float64)
    assert (transport(v, u1.T @ u0, v1.T @ v0, squared=True) >= 0).all()
    # pure augmentation [I; 0] pads with zeros, for both kinds
    pad = torch.cat([torch.eye(3), torch.zeros(2, 3)]).double()
    assert torch.equal(transport(v, pad, pad, squared=True)[:3, :3], v)
    assert transport(v, pad, pad, squared=True)[3:].abs().sum() == 0


def test_orthonormal_helper():
    q = orthonormal(20, 7, torch.Generator().manual_seed(0))
    assert float((q.T @ q - torch.eye(7)).norm()) < 1e-5
