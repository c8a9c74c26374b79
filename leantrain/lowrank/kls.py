"""Pure tensor math of the KLS integrator (spec: /work/shared/methods/dlrt.md, Sections 2-3).

Kept free of modules and optimizers so each piece is tested against the formulas on its own.
Paper: Schotthöfer et al., "Low-rank lottery tickets", NeurIPS 2022, https://arxiv.org/abs/2205.13571.
"""
from __future__ import annotations

import math

import torch

# Optimizer-state keys holding running averages of squared gradients (Adam/AdamW, RMSprop, Adagrad): they are
# moved to a new basis with the element-wise squared change of basis, which keeps them >= 0.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def orth(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``a`` (reduced Householder QR, sign-fixed so diag(R) >= 0).

    The sign fix makes orth([U0 | K]) start with U0 itself when U0 is orthonormal, so a basis that is merely
    augmented keeps its old directions in place (and optimizer state can be carried over by the same map).
    Householder Q is orthonormal even when ``a`` is rank-deficient (spec Section 7).
    """
    q, r = torch.linalg.qr(a.to(_work_dtype(a)), mode="reduced")
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return (q * d).to(a.dtype)


# A new direction is kept only if the part of K1's column outside the basis so far exceeds this many units of
# roundoff times ||K1||_F (float32's for float32/bf16/fp16 factors, float64's for float64). Below it the residual is
# what storing K1 and projecting out U0 leaves, not a direction of the gradient step (see ``augment``). bf16/fp16
# factors keep float32's threshold: 64 of their own ulps (0.5 ||K1|| in bf16) would stop all augmentation.
AUGMENT_RTOL_ULPS = 64


def augment(u0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Û = [U0 | new directions of K1] with r..min(n, 2r) columns; span(Û) ⊇ span(U0), so Û S̃ V̂ᵀ = W0 exactly.

    Rank-revealing: U0 is re-orthonormalised (sign-fixed QR, so it stays in place), then each column of K1 is
    projected out of the basis built so far (twice, in float64) and appended only if the remainder is above
    ``AUGMENT_RTOL_ULPS``·eps·||K1||_F. A Householder QR of [U0 | K1] always returns min(n, 2r) columns:
    when the step K1 − U0 S0 has lower rank (Adam's first update is ≈ lr·sign(∇K), whose rows repeat), the
    surplus columns are orthonormal completions built from float rounding -- directions that change completely
    under a one-ulp change of K1 (measured: 2 processes vs 1, Û differed by 0.34 for identical-to-1-ulp K1) and
    then receive a full Adam step in the S-step. Dropping them keeps the Galerkin space the span of [U0 | K1].
    """
    wd = torch.float64
    k = k1.to(wd)
    tol = AUGMENT_RTOL_ULPS * torch.finfo(_work_dtype(k1)).eps * float(k.norm())
    if u0.shape[1] + k.shape[1] <= u0.shape[0]:
        basis, rest = _first_round(u0.to(wd), k, tol)
    else:
        basis, rest = orth(u0.to(wd)), k
    while rest.shape[1] and basis.shape[1] < basis.shape[0]:
        for _ in range(2):  # project out of the basis so far, repeated once: orthogonal to working precision
            rest = rest - basis @ (basis.T @ rest)
        rest = rest[:, rest.norm(dim=0) > tol]  # a column this small stays small in any later projection
        if not rest.shape[1]:
            break
        # Householder QR = Gram-Schmidt in column order: |R_jj| is column j's part outside columns < j. Accept the
        # columns before the first one at or below tol, drop that one, and go on with the columns after it.
        q, r = torch.linalg.qr(rest, mode="reduced")
        diag = torch.diagonal(r)
        low = (diag.abs() <= tol).nonzero()
        j = int(low[0]) if len(low) else diag.shape[0]
        sign = torch.where(diag[:j] < 0, -1.0, 1.0).to(wd)
        basis = torch.cat([basis, q[:, :j] * sign], dim=1)[:, :basis.shape[0]]
        rest = rest[:, j + 1:]
    return basis.to(u0.dtype)


def _first_round(u: torch.Tensor, k: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``augment``'s re-orthonormalisation of U0 and its first round over K1 as one Householder QR of [U0 | K1].

    Householder QR is Gram-Schmidt in column order: its first r columns (sign-fixed) are ``orth(U0)``, and |R_jj|
    of a K1 column is that column's part outside U0 and the K1 columns before it -- what the loop compares with
    ``tol`` (a column whose projection alone is below ``tol`` has |R_jj| below it too). So the columns before the
    first small one are accepted, that one is dropped, and the K1 columns after it go on to the loop: the same
    decisions, for one QR instead of a QR of U0, two projections and a QR of the rest (1.5x faster per call on
    500 x 16 factors, where a small model's step time goes). Returns (basis so far, K1 columns still to do)."""
    r0 = u.shape[1]
    q, r = torch.linalg.qr(torch.cat([u, k], dim=1), mode="reduced")
    diag = torch.diagonal(r)
    q = q * torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    low = (diag[r0:].abs() <= tol).nonzero()
    j = int(low[0]) if len(low) else k.shape[1]
    return q[:, :r0 + j], k[:, j + 1:]


def truncation_rank(sigma: torch.Tensor, tau: float, absolute: bool = False) -> int:
    """Smallest r with ||σ[r:]||₂ < ϑ, ϑ = τ·||σ||₂ (relative, default) or ϑ = τ (absolute).

    The clean rule of spec Section 2 (the reference code's loop skips the last singular value -- an
    off-by-one we do not copy). ``sigma`` must be sorted descending.
    """
    if tau <= 0:
        raise ValueError(f"truncation tolerance tau={tau!r} must be > 0")
    s2 = [v * v for v in sigma.detach().to(torch.float64).tolist()]  # a few dozen values: Python floats, one sync
    theta = tau if absolute else tau * math.sqrt(math.fsum(s2))
    rank, tail = 0, 0.0
    for j in range(len(s2) - 1, -1, -1):  # tail = ||σ[j:]||, growing as j falls
        tail += s2[j]
        rank += math.sqrt(tail) >= theta
    return rank


def transport(t: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None,
              squared: bool = False) -> torch.Tensor:
    """t' = A t Bᵀ for a change of basis (A: new×old rows, B: new×old columns); A∘A, B∘B if ``squared``.

    For a first moment m (a matrix in old coordinates) this is the exact projection of the W-space direction
    U_old m V_oldᵀ onto the new bases. Second moments are not linear in the basis; the squared map is the
    diagonal approximation (exact when the change of basis is a signed permutation, e.g. pure augmentation).
    """
    out = t
    if left is not None:
        a = left * left if squared else left
        out = a.to(out.dtype) @ out
    if right is not None:
        b = right * right if squared else right
        out = out @ b.to(out.dtype).T
    return out.contiguous()


def svd_truncate(s_hat: torch.Tensor, tau: float | None, min_rank: int, max_rank: int, absolute: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of Ŝ (a×b) and the kept rank: returns (P_r a×r1, σ_r, Q_r b×r1) with Ŝ ≈ P_r diag(σ_r) Q_rᵀ.

    ``tau=None`` keeps min(max_rank, a, b) directions (no adaptivity). Bounds clamp the τ rule.
    """
    p, sigma, qh = torch.linalg.svd(s_hat.to(torch.float64), full_matrices=False)  # tiny (2r×2r): fp64 is free
    k = sigma.shape[0]
    r1 = k if tau is None else truncation_rank(sigma, tau, absolute)
    r1 = max(min_rank, min(r1, max_rank, k))
    dt = s_hat.dtype
    return p[:, :r1].to(dt), sigma[:r1].to(dt), qh[:r1].T.to(dt)  # Q = Qhᵀ (spec pitfall: not Qh)
