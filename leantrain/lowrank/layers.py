"""Low-rank layers W = U S Vᵀ for DLRT (Schotthöfer et al. 2022, https://arxiv.org/abs/2205.13571).

U (n×r) and V (m×r) are orthonormal *buffers*: they are bases, updated by assignment in the KLS integrator
(leantrain.lowrank.optimizer), never by a gradient. The leaves are S (r×r) and, only while a KLS step runs,
K = U S (n×r) and L = V Sᵀ (m×r). W is never formed: a Linear computes y = ((x V) Sᵀ) Uᵀ + b.

Modes (set by the integrator, ``"s"`` outside of a step):
  * ``"s"``  -- W = U S Vᵀ with S the leaf (also the Galerkin S-step in the augmented basis, S may be a×b).
  * ``"kl"`` -- one forward that yields both ∂L/∂K = G V and ∂L/∂L = Gᵀ U at the same point W0:
    y = (x V) Kᵀ + [(x̄ L) Uᵀ − detach(same)] with x̄ = detach(x); the bracket is 0 in value and only routes
    the L gradient, so the value and the input gradient are those of W0 (nothing is counted twice).
    With ``cache=True`` the layer keeps its input X and output gradient dY, from which the integrator gets
    the S gradient Ûᵀ G V̂ without another forward/backward pass.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("s", "kl")


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """Random rows×cols matrix with orthonormal columns (Q of a Gaussian, sign-fixed so it is Haar)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return (q * d).to(dtype)


def _check_rank(name: str, rank: int, n: int, m: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"{name}: rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(n, m):
        raise ValueError(f"{name}: rank={rank} must be in [1, min(out, in)={min(n, m)}] for a {n}x{m} weight")


class LowRankMixin(nn.Module):
    """Shared state of a low-rank layer; subclasses implement ``_apply_v``/``_apply_u`` (x ↦ x V, z ↦ z Uᵀ)."""

    n: int  # rows of W (out features)
    m: int  # columns of W (in features, in·kh·kw for conv)

    def _init_factors(self, rank: int, min_rank: int | None, max_rank: int | None, bias: bool,
                      dtype: torch.dtype | None, device) -> None:
        n, m = self.n, self.m
        _check_rank(type(self).__name__, rank, n, m)
        self.max_rank = min(n, m) if max_rank is None else int(max_rank)
        self.min_rank = min(2, rank) if min_rank is None else int(min_rank)
        if not 1 <= self.min_rank <= self.max_rank <= min(n, m):
            raise ValueError(f"{type(self).__name__}: rank bounds min_rank={self.min_rank}, max_rank={self.max_rank} "
                             f"must satisfy 1 <= min_rank <= max_rank <= {min(n, m)}")
        if not self.min_rank <= rank <= self.max_rank:
            raise ValueError(f"{type(self).__name__}: rank={rank} outside [min_rank={self.min_rank}, "
                             f"max_rank={self.max_rank}]")
        dtype = dtype or torch.get_default_dtype()
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        self.register_buffer("U", orthonormal(n, rank, g, dtype).to(device))
        self.register_buffer("V", orthonormal(m, rank, g, dtype).to(device))
        # Reference adaptive init: S = diag(sorted |N(0,1)|), scaled like kaiming-uniform's std for a dense W.
        sv = torch.randn(rank, generator=g).abs().sort(descending=True).values
        sv = sv * math.sqrt(n / 3.0 / float((sv**2).sum().clamp_min(1e-12)))
        self.S = nn.Parameter(torch.diag(sv).to(device=device, dtype=dtype))
        self.K = nn.Parameter(torch.empty(0, device=device, dtype=dtype))  # live only inside a KLS step
        self.L = nn.Parameter(torch.empty(0, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(m)
        self.bias = nn.Parameter(torch.empty(n, device=device, dtype=dtype).uniform_(-bound, bound)) if bias else None
        self.mode = "s"
        self.cache = False
        self._cached: list[tuple[torch.Tensor, torch.Tensor]] = []

    # --- factors --------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Replace the factors in place (new shapes allowed); keeps the Parameter object of S."""
        if U.shape[0] != self.n or V.shape[0] != self.m or S.shape != (U.shape[1], V.shape[1]):
            raise ValueError(f"{type(self).__name__}: factor shapes U{tuple(U.shape)} S{tuple(S.shape)} "
                             f"V{tuple(V.shape)} do not fit a {self.n}x{self.m} weight")
        self.U = U.detach().to(self.S.dtype).contiguous()
        self.V = V.detach().to(self.S.dtype).contiguous()
        self.S.data = S.detach().to(self.S.dtype).contiguous()

    def weight_matrix(self) -> torch.Tensor:
        """Dense W = U S Vᵀ (n×m): for tests, export and merging only, never used in training."""
        return self.U @ self.S.detach() @ self.V.T

    def eval_params(self) -> int:
        """Parameters needed at inference: r(n+m) + r² (+ bias)."""
        r = self.rank
        return r * (self.n + self.m) + r * r + (self.n if self.bias is not None else 0)

    def dense_params(self) -> int:
        return self.n * self.m + (self.n if self.bias is not None else 0)

    # --- forward --------------------------------------------------------------------------------------------
    def _core(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "s":
            return self._apply_u(self._mix(self._apply_v(x, self.V), self.S), self.U)
        if self.mode != "kl":
            raise ValueError(f"{type(self).__name__}: unknown mode {self.mode!r}; expected one of {MODES}")
        if self.K.shape != (self.n, self.rank) or self.L.shape != (self.m, self.rank):
            raise RuntimeError(f"{type(self).__name__}: 'kl' mode needs K ({self.n}x{self.rank}) and "
                               f"L ({self.m}x{self.rank}); got {tuple(self.K.shape)}, {tuple(self.L.shape)}")
        y_k = self._apply_u(self._apply_v(x, self.V), self.K)  # W = K Vᵀ: grad G V
        y_l = self._apply_u(self._apply_v(x.detach(), self.L), self.U)  # W = U Lᵀ: grad Gᵀ U
        return y_k + (y_l - y_l.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "kl" and self._fused_kl_ok():
            return self._add_bias(_KLLinear.apply(x, self.K, self.L, self.U, self.V, self))
        y = self._core(x)
        y = self._add_bias(y)
        if self.mode == "kl" and self.cache and torch.is_grad_enabled() and y.requires_grad:
            entry = [x.detach(), None]
            self._cached.append(entry)  # type: ignore[arg-type]

            def keep(grad: torch.Tensor, entry=entry) -> None:
                entry[1] = grad.detach()

            y.register_hook(keep)
        return y

    def _fused_kl_ok(self) -> bool:
        """The one-Function K/L pass (``_KLLinear``) applies: a Linear, under autograd, with K and L in shape."""
        return (isinstance(self, LowRankLinear) and torch.is_grad_enabled()
                and self.K.shape == (self.n, self.rank) and self.L.shape == (self.m, self.rank))

    def pop_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = [(x, dy) for x, dy in self._cached if dy is not None]
        self._cached = []
        return out

    def extra_repr(self) -> str:
        return f"out={self.n}, in={self.m}, rank={self.rank}, bounds=[{self.min_rank}, {self.max_rank}]"


class _KLLinear(torch.autograd.Function):
    """The "kl" pass of a Linear as one autograd node: y = (x V) Kᵀ (the value at W0 = K Vᵀ = U Lᵀ), and in
    backward ∇x = (dY K) Vᵀ, ∇K = dYᵀ (x V), ∇L = xᵀ (dY U) -- the products the two-branch graph of ``_core``
    computes, without its detach/subtract/add nodes and output hook; (x, dY) go to the layer's cache for the
    S-step when it caches."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, K: torch.Tensor, L: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                layer: LowRankMixin) -> torch.Tensor:
        xv = x @ V
        ctx.save_for_backward(x, xv, K, U, V)
        ctx.layer = layer
        return xv @ K.T

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xv, K, U, V = ctx.saved_tensors
        layer = ctx.layer
        dy2 = dy.reshape(-1, dy.shape[-1])
        gx = (dy @ K) @ V.T if ctx.needs_input_grad[0] else None
        gk = dy2.T @ xv.reshape(-1, xv.shape[-1]) if ctx.needs_input_grad[1] else None
        gl = x.reshape(-1, x.shape[-1]).T @ (dy2 @ U) if ctx.needs_input_grad[2] else None
        if layer.cache:
            layer._cached.append((x.detach(), dy.detach()))
        return gx, gk, gl, None, None, None


class LowRankLinear(LowRankMixin):
    """y = x (U S Vᵀ)ᵀ + b with orthonormal U (out×r), V (in×r); cost O(batch·r·(in+out+r))."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 min_rank: int | None = None, max_rank: int | None = None, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n, self.m = out_features, in_features
        self._init_factors(rank, min_rank, max_rank, bias, dtype, device)

    @staticmethod
    def _apply_v(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return x @ V

    @staticmethod
    def _mix(z: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return z @ S.T

    @staticmethod
    def _apply_u(z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return z @ U.T

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def project_grad(self, x: torch.Tensor, dy: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Uᵀ G V with G = dYᵀ X, without forming G (the S-step gradient from cached activations)."""
        x2, dy2 = x.reshape(-1, self.m), dy.reshape(-1, self.n)
        return (dy2 @ U).T @ (x2 @ V)


class LowRankConv2d(LowRankMixin):
    """Conv2d whose kernel, reshaped to (out, in·kh·kw), is U S Vᵀ: a rank-r conv then a 1×1 conv.

    groups=1 only (a grouped kernel is block-diagonal, not one matrix).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, *, min_rank: int | None = None, max_rank: int | None = None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.n, self.m = out_channels, in_channels * ks[0] * ks[1]
        self._init_factors(rank, min_rank, max_rank, bias, dtype, device)

    def _apply_v(self, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        kernel = V.T.reshape(V.shape[1], self.in_channels, *self.kernel_size)
        return F.conv2d(x, kernel, None, self.stride, self.padding, self.dilation)

    @staticmethod
    def _mix(z: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,oc->bohw", z, S)

    @staticmethod
    def _apply_u(z: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,oc->bohw", z, U)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def project_grad(self, x: torch.Tensor, dy: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Uᵀ G V: the dense kernel gradient G (out × in·kh·kw) is formed transiently -- conv kernels are small."""
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        g = torch.nn.grad.conv2d_weight(x, shape, dy, self.stride, self.padding, self.dilation)
        return U.T @ g.reshape(self.n, self.m) @ V


def lowrank_layers(module: nn.Module) -> list[tuple[str, LowRankMixin]]:
    """(name, layer) for every low-rank layer inside ``module`` (the module itself counts, name "")."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LowRankMixin)]
