"""The "Low-Rank" pre-training baseline of the GaLore paper: every targeted weight is W = B A with rank r, and
B, A train from scratch (with all non-targeted parameters: embeddings, norms, lm_head).

GaLore (Zhao et al., ICML 2024, https://arxiv.org/abs/2403.03507, Table 2) compares full-rank training, GaLore and
this factorisation (Kamalakara et al. 2022, https://arxiv.org/abs/2211.16667); the factorised model is restricted
to rank r for the whole run, which is why its perplexity trails. B and A start from the truncated SVD of the
model's own random init (B = U_r sqrt(S_r), A = sqrt(S_r) V_rᵀ), so the first forward pass is the best rank-r
approximation of the dense init instead of an arbitrary rescaled one.

Registered here as ``lowrank`` (causal-LM pre-training only).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..methods import Calibration, EstimatorTensor, MethodBase, head_parameter_names, register
from ..targets import is_head, set_submodule


class FactorizedLinear(nn.Module):
    """y = x Aᵀ Bᵀ + b with A: (r, in), B: (out, r)."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if not 0 < rank < min(out_f, in_f):
            raise ValueError(f"low-rank rank {rank} must be in 1..{min(out_f, in_f) - 1} for a {out_f}x{in_f} Linear")
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
            root = s[:rank].sqrt()
            dtype = linear.weight.dtype
            self.B = nn.Parameter((u[:, :rank] * root).to(dtype))
            self.A = nn.Parameter((root[:, None] * vh[:rank]).to(dtype))
        self.bias = linear.bias
        self.in_features, self.out_features, self.rank = in_f, out_f, rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(nn.functional.linear(x, self.A), self.B)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def factorize(model: nn.Module, rank: int) -> list[str]:
    """Replace every non-head nn.Linear whose smaller side exceeds ``rank`` (else nothing is saved) by a
    FactorizedLinear; the head stays dense like the embeddings."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not is_head(n) and min(m.weight.shape) > rank]
    if not names:
        raise ValueError(f"low-rank: no Linear layer is larger than rank {rank}")
    for name in names:
        set_submodule(model, name, FactorizedLinear(model.get_submodule(name), rank))
    return names


class LowRankBaseline(MethodBase):
    name = "lowrank"
    default_lr = 1e-3
    summary = "GaLore paper's Low-Rank baseline: W = B A trained from scratch (causal-LM pre-training)"
    trains_base = True
    tasks = ("causal-lm",)
    replaces_targets = True
    options = ("rank",)

    def estimator_tensors(self, module: str, out_f: int, in_f: int, opts: Any) -> list[EstimatorTensor]:
        """W (out x in) becomes B (out x r) A (r x in), both trained."""
        return [EstimatorTensor(module + ".B", (out_f, opts.rank), base=True),
                EstimatorTensor(module + ".A", (opts.rank, in_f), base=True)]

    def activation_bytes_per_token(self, out_f: int, in_f: int, rank: int, elt: int) -> int:
        return elt * rank  # x Aᵀ, kept for B's gradient

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        factorize(model, cfg.rank)
        return factor_groups(model, (".A", ".B"), "lowrank")


def factor_groups(model: nn.Module, suffixes: tuple[str, ...], name: str) -> list[dict]:
    """Pre-training from scratch: everything trains; the factor tensors (names ending in ``suffixes``) form
    group ``name``, the rest (embeddings, norms, biases) group "other"; the task head is the run's business."""
    head = head_parameter_names(model)
    factors, other = [], []
    for n, p in model.named_parameters():
        p.requires_grad_(True)
        if n not in head:
            (factors if n.endswith(suffixes) else other).append(p)
    groups = [{"params": factors, "name": name}, {"params": other, "name": "other"}]
    return [g for g in groups if g["params"]]


LOWRANK = register(LowRankBaseline())
