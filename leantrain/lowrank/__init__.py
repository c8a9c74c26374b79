"""DLRT: dynamical low-rank training with the rank-adaptive KLS integrator.

Schotthöfer, Zangrando, Kusch, Ceruti, Tudisco, "Low-rank lottery tickets: finding efficient low-rank neural
networks via matrix differential equations", NeurIPS 2022, https://arxiv.org/abs/2205.13571.

    from leantrain.lowrank import convert_to_lowrank, KLSOptimizer
    convert_to_lowrank(model, "all-linear", tau=0.1)          # dense init -> truncated SVD factors
    opt = KLSOptimizer(model, inner="sgd", lr=0.05, tau=0.1)  # or inner="adam", a factory, an optimizer
    loss = opt.step(closure)                                  # closure: zero_grad, forward, backward, return loss
"""
from __future__ import annotations

from .convert import convert_to_lowrank, make_lowrank, model_params, resolve_targets
from .io import load_lowrank, load_lowrank_state, lowrank_state, save_lowrank
from .kls import augment, orth, svd_truncate, transport, truncation_rank
from .layers import LowRankConv2d, LowRankLinear, LowRankMixin, lowrank_layers, orthonormal
from .optimizer import KLSOptimizer

__all__ = [
    "KLSOptimizer", "LowRankConv2d", "LowRankLinear", "LowRankMixin", "augment", "convert_to_lowrank",
    "load_lowrank", "load_lowrank_state", "lowrank_layers", "lowrank_state", "make_lowrank", "model_params",
    "orth", "orthonormal", "resolve_targets", "save_lowrank", "svd_truncate", "transport", "truncation_rank",
]
