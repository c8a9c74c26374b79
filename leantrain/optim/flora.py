"""Flora: Adafactor whose momentum of a matrix lives in a random projection that is resampled every kappa steps.

Paper: Y. Hao, Y. Cao, L. Mou, *Flora: Low-Rank Adapters Are Secretly Gradient Compressors*, ICML 2024,
https://arxiv.org/abs/2402.03293 (reference implementation ``flora-opt`` 0.0.3). Per tensor, step t:

    beta2_t = 1 - t^(-0.8);   Q = G^2 + eps1
    matrix:  r <- beta2_t r + (1 - beta2_t) mean_cols(Q),  c <- (same) mean_rows(Q);
             U = G / sqrt(r c^T / mean(r))            (Adafactor's factored second moment)
    vector:  v <- beta2_t v + (1 - beta2_t) Q;   U = G / sqrt(v)
    momentum of a matrix (Flora): C = compressed momentum, A = N(0, 1/rank) random matrix from the seed
             (rank x m, left, if m < n; n x rank, right, otherwise):  D = (1 - b1) U + b1 up(C)
             every kappa steps: new seed, C <- down'(up(C))  (the momentum moved into the new projection)
             C <- b1 C + (1 - b1) down(U);   U = D
    momentum of anything else: U = (1 - b1) U + b1 m;  m <- U (Adafactor's)
    U <- U / max(1, RMS(U) / d);   W <- W (1 - lr_t wd) - lr_t U,   lr_t = lr * max(eps2, RMS(W)) if scale_parameter

Compressed momentum is used for matrices with min(m, n) >= rank and max/min <= 4 (the reference rules out
embeddings); seeds follow flora-opt (parameter k starts from seed + k; ``split_seed`` gives the left and right
projection seeds; ``next_seed`` advances), so both draw the same projections.

State: ``exp_avg`` (compressed or full) through the group's codec; ``exp_avg_sq_row``/``exp_avg_sq_col`` (fp32,
m + n values) for matrices, ``exp_avg_sq`` (fp32) otherwise; ``proj_seed``. The projection is regenerated
from the seed (never stored). FSDP2-sharded parameters are refused (row/column means need the whole tensor).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .adam import BlockOptimizer
from .apollo import next_seed
from .spec import (
    STEP_BYTES,
    OptimizerOptions,
    OptimizerSpec,
    StateOptions,
    StateTensor,
    codec_bytes,
    register,
)


def split_seed(seed: int) -> tuple[int, int]:
    """(left, right) projection seeds from one seed (flora-opt's rule)."""
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randint(0, torch.iinfo(torch.int64).max, (2,), generator=gen).tolist()
    return left, right


def _projection(shape: tuple[int, int], rank: int, seed: int) -> tuple[Tensor, bool]:
    """(A, left): A is rank x m (left, when m < n) or n x rank (right), N(0, 1/rank) entries."""
    left = shape[0] < shape[-1]
    lseed, rseed = split_seed(seed)
    size = (rank, shape[0]) if left else (shape[-1], rank)
    gen = torch.Generator().manual_seed(lseed if left else rseed)
    return torch.randn(size, generator=gen, dtype=torch.float32) / math.sqrt(rank), left


def down(x: Tensor, rank: int, seed: int) -> Tensor:
    """Compress a full matrix: A x (left) or x A (right)."""
    a, left = _projection(tuple(x.shape), rank, seed)
    return a @ x if left else x @ a


def up(c: Tensor, rank: int, shape: tuple[int, int], seed: int) -> Tensor:
    """Decompress: A^T c (left) or c A^T (right)."""
    a, left = _projection(shape, rank, seed)
    return a.T @ c if left else c @ a.T


class Flora(BlockOptimizer):
    """Flora (see the module docstring); fp32 momentum by default."""

    moments = (("exp_avg", True),)
    default_codec = "fp32"

    def __init__(self, params: Iterable, lr: float = 1e-3, *, rank: int | None = 8, kappa: int = 1000,
                 beta1: float = 0.9, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, weight_decay: float = 0.0, scale_parameter: bool = True, seed: int = 0,
                 block_size: int = 256, min_8bit_size: int = 4096, skip_nonfinite: bool = False,
                 codec: str | None = None) -> None:
        defaults = {"lr": lr, "rank": None, "flora_rank": rank, "kappa": kappa, "beta1": beta1,
                    "eps_pair": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay, "scale_parameter": scale_parameter, "seed": seed,
                    "block_size": block_size, "min_8bit_size": min_8bit_size, "skip_nonfinite": skip_nonfinite,
                    "codec": codec}
        super().__init__(params, defaults)

    def _check(self, g: dict[str, Any], where: str) -> None:
        super()._check(g, where)
        name = type(self).__name__
        if not 0.0 <= g.get("beta1", 0.0) < 1.0:
            raise ValueError(f"{name}: beta1={g['beta1']!r} in {where} must be in [0, 1)")
        kappa = g.get("kappa", 1)
        if isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 1:
            raise ValueError(f"{name}: kappa={kappa!r} in {where} must be a positive int")
        if g.get("rank") is not None:
            raise ValueError(f"{name}: group key rank={g['rank']!r} in {where}: Flora's projection rank is the "
                             "constructor's rank (group key flora_rank); it never projects like GaLore")
        rank = g.get("flora_rank")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{name}: rank={rank!r} in {where} must be a positive int or None")

    @staticmethod
    def _compressed(group: dict[str, Any], shape: tuple[int, ...]) -> bool:
        """The reference's rule: matrices at least rank on each side and at most 4x as long as wide."""
        rank = group["flora_rank"]
        return (rank is not None and group["beta1"] > 0 and len(shape) == 2 and min(shape) >= rank
                and max(shape) / min(shape) <= 4)

    def _param_seed(self, p: Tensor, group: dict[str, Any]) -> int:
        params = [q for grp in self.param_groups for q in grp["params"]]
        return next(i for i, q in enumerate(params, 1) if q is p) + int(group.get("seed") or 0)

    def _moment_numel(self, group: dict[str, Any], p: Tensor) -> int:
        if not self._compressed(group, tuple(p.shape)):
            return p.numel()
        m, n = p.shape
        return group["flora_rank"] * max(m, n)

    def _check_saved(self, pid: int, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        """The saved momentum has the compressed size where the momentum is compressed."""
        if group["beta1"] <= 0:
            return
        n = self._moment_numel(group, p)
        for sfx, (shape, _) in self._codec(group, n, True, p).layout(n).items():
            got = tuple(st["exp_avg" + sfx].shape) if "exp_avg" + sfx in st else None
            if got != shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: parameter {pid} (shape {tuple(p.shape)}) "
                                 f"has saved exp_avg{sfx} of shape {got}, expected {shape}")

    def _init(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["proj_seed"] = self._param_seed(p, group)
        if group["beta1"] > 0:
            self._init_state(state, group, self._moment_numel(group, p), p)
        zeros = {"dtype": torch.float32, "device": p.device}
        if p.ndim == 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[0], **zeros)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[1], **zeros)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, **zeros)

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        if hasattr(p, "to_local"):
            raise TypeError(f"{type(self).__name__}: FSDP2-sharded parameter of shape {tuple(p.shape)} is not "
                            "supported (factored second moments need whole rows and columns); use DDP")
        state = self.state[p]
        if not state:
            self._init(p, state, group)
        state["step"] += 1
        t = int(state["step"])
        g = p.grad.float()
        scale = self._gnorm_scale(g, state, group, t)
        if scale != 1.0:
            g = g * scale
        u = self._preconditioned(g, state, group, t)
        if group["beta1"] > 0:
            u = self._momentum(p, u, state, group, t)
        u = u / (u.norm() / math.sqrt(u.numel()) / group["clip_threshold"]).clamp(min=1.0)
        self._apply(p, u, group)

    @staticmethod
    def _preconditioned(g: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> Tensor:
        """G / sqrt(second moment): Adafactor's factored estimate for a matrix, the full one otherwise."""
        beta2 = 1.0 - math.pow(t, group["decay_rate"])
        q = g.square().add_(group["eps_pair"][0])
        if g.ndim == 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2).add_(q.mean(dim=-1), alpha=1.0 - beta2)
            col.mul_(beta2).add_(q.mean(dim=-2), alpha=1.0 - beta2)
            r = (row / row.mean()).rsqrt().unsqueeze(-1)
            return r * col.unsqueeze(-2).rsqrt() * g
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(q, alpha=1.0 - beta2)
        return v.rsqrt() * g

    def _momentum(self, p: Tensor, u: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> Tensor:
        """Adafactor's momentum, compressed by a resampled random projection for matrices."""
        b1 = group["beta1"]
        n = self._moment_numel(group, p)
        codec = self._codec(group, n, True, p)
        enc = self._enc(state, "exp_avg", codec, n)
        m = codec.decode_range(enc, 0, n)
        if not self._compressed(group, tuple(p.shape)):
            out = u * (1 - b1) + m.view(u.shape) * b1
            codec.encode_range(enc, 0, out.reshape(-1))
            return out
        rank, shape, seed = group["flora_rank"], tuple(u.shape), state["proj_seed"]
        c = m.view((rank, shape[1]) if shape[0] < shape[1] else (shape[0], rank))
        out = u * (1 - b1) + up(c, rank, shape, seed) * b1
        if t % group["kappa"] == 0:  # resample: carry the momentum into the new projection
            new = next_seed(seed)
            c = down(up(c, rank, shape, seed), rank, new)
            state["proj_seed"] = seed = new
        c = c * b1 + down(u, rank, seed) * (1 - b1)
        codec.encode_range(enc, 0, c.reshape(-1))
        return out

    @staticmethod
    def _apply(p: Tensor, u: Tensor, group: dict[str, Any]) -> None:
        """W <- W - lr_t wd W - lr_t U, lr_t relative to RMS(W) when ``scale_parameter`` (Adafactor)."""
        w = p.detach() if p.dtype == torch.float32 else p.detach().float()
        lr = group["lr"]
        if group["scale_parameter"]:
            lr = lr * max(group["eps_pair"][1], float(w.norm() / math.sqrt(w.numel())))
        if group.get("weight_decay", 0.0):
            w.add_(w, alpha=-group["weight_decay"] * lr)
        w.add_(u, alpha=-lr)
        if p.dtype != torch.float32:
            p.copy_(w)


def build_flora(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    """Flora on every tensor (compressed momentum where the reference compresses: --rank; resampled every --gap
    steps), beta1 0.9, absolute lr (scale_parameter=False, so the task's AdamW lr applies); 8-bit momentum
    (the embedding and head keep full momentum, which dominates a small model's state)."""
    return Flora(groups, lr=lr, rank=opts.rank, kappa=opts.gap, beta1=0.9, weight_decay=opts.weight_decay,
                 scale_parameter=False, block_size=opts.block_size, codec="8bit")


def flora_state(t: StateTensor, o: StateOptions) -> tuple[int, int]:
    """Estimator: the 8-bit momentum (rank x max(m, n) where compressed: min side >= rank, aspect <= 4; no stored
    projection) plus the fp32 second moment (factored: m + n for a matrix, full otherwise)."""
    n = math.prod(t.shape)
    if len(t.shape) == 2:
        m, k = t.shape
        second = 4 * (m + k)
        compressed = min(m, k) >= o.rank and max(m, k) / min(m, k) <= 4
        moment = o.rank * max(m, k) if compressed else n
    else:
        second, moment = 4 * n, n
    return STEP_BYTES + codec_bytes("8bit", moment, o.block_size) + second, 0


register(OptimizerSpec("flora", build_flora, states=1, codec="8bit", state_bytes=flora_state,
                       summary="Flora: Adafactor with momentum compressed in a random rank-r projection "
                               "resampled every --gap steps; 8-bit momentum", options=("rank", "gap", "block_size")))
