"""The ``dlrt`` training method for leantrain's loop (registered here as ``dlrt``).

Paper: Schotthöfer et al., "Low-rank lottery tickets", NeurIPS 2022, https://arxiv.org/abs/2205.13571.

Choices (documented in docs/dlrt.md):
  * targets: ``cfg.targets`` (default every nn.Linear except the head ``classifier``), converted from the dense
    (pretrained) init by truncated SVD.
  * ranks per layer: ceiling ``max_rank = min(n, m) // 2`` (reference cap: the augmented basis 2r still fits);
    floor ``min_rank = min(cfg.rank, max_rank)``; initial rank = the τ rule applied to σ(W) -- the smallest r with
    ||σ[r:]|| < τ·||σ|| -- clamped to [floor, ceiling]. So step 1 starts from the dense model up to the same
    relative error the integrator tolerates afterwards, instead of from an arbitrary cut.
  * tau = ``cfg.tau`` (relative); ``cfg.extra["dlrt_absolute_tau"]`` makes it absolute,
    ``cfg.extra["dlrt_recompute_s"]`` takes ∇S from a second forward/backward instead of cached activations,
    ``cfg.extra["dlrt_freeze_other"]`` freezes all non-low-rank parameters (the head still trains).
  * what trains: K, L, S and bias of every low-rank layer plus all other parameters of the model (as in the
    paper, which trains whole networks); the head is added by the loop.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..methods import Calibration, EstimatorTensor, MethodBase, head_parameter_names, register
from .convert import convert_to_lowrank, model_params
from .io import load_lowrank_state, lowrank_state
from .layers import lowrank_layers
from .optimizer import KLSOptimizer


class DLRTMethod(MethodBase):
    """Rank-adaptive low-rank training of the model's linear layers with the KLS integrator."""

    name = "dlrt"
    default_lr = 5e-5  # same scale as full fine-tuning: K = U S and L = V Sᵀ have the entries' scale of W
    summary = "DLRT: rank-adaptive low-rank layers trained by the KLS integrator (--tau; --rank = minimum rank per layer)"
    trains_base = True
    replaces_targets = True
    options = ("rank", "targets", "tau")

    # ---- estimator terms (leantrain memory; ranks adapt, so ``opts.dlrt_ranks`` may give them per layer) ----
    def trains_other(self, opts: Any) -> bool:
        return not getattr(opts, "dlrt_freeze_other", False)

    @staticmethod
    def _rank(module: str, opts: Any) -> int:
        return (getattr(opts, "dlrt_ranks", None) or {}).get(module, opts.rank)

    def estimator_tensors(self, module: str, out_f: int, in_f: int, opts: Any) -> list[EstimatorTensor]:
        """W -> U (out x r), V (in x r) bases and S (r x r); K, L are built and trained inside each step."""
        r = self._rank(module, opts)
        return [EstimatorTensor(module + ".U", (out_f, r), trains=False),
                EstimatorTensor(module + ".V", (in_f, r), trains=False),
                EstimatorTensor(module + ".S", (r, r)),
                EstimatorTensor(module + ".K", (out_f, r), stored=False),
                EstimatorTensor(module + ".L", (in_f, r), stored=False)]

    def activation_bytes_per_token(self, out_f: int, in_f: int, rank: int, elt: int) -> int:
        """x V (r) in the K/L pass and the cached output gradient dY (out) for the S-step."""
        return elt * (rank + out_f)

    def estimator_extras(self, targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
        """Alive through a KLS step: K, L values, bases Û, V̂, S̃ (2r x 2r) with its gradient and moved moments."""
        step = 0
        for module, n, m in targets:
            r = self._rank(module, opts)
            step += (n * r + m * r + 2 * r * (n + m) + 4 * r * r * (1 + 1 + opts.n_states)) * opts.elt
        return {"gradients.dlrt_step": step}
    # Ranks adapt, so parameters are replaced by ones of new shapes mid-run: no DDP wrapper (gradients are
    # averaged by hand) and no FSDP sharding.
    changes_parameter_shapes = True

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        from .convert import resolve_targets

        targets = cfg.targets
        names = resolve_targets(model, targets)
        min_rank: dict[str, int] = {}
        for name in names:
            w = model.get_submodule(name).weight
            full = min(w.shape[0], w[0].numel())
            min_rank[name] = max(1, min(cfg.rank, full // 2))
        convert_to_lowrank(model, names, tau=cfg.tau, init="svd", min_rank=min_rank)
        head = head_parameter_names(model)
        freeze_other = bool(cfg.extra.get("dlrt_freeze_other", False))
        factors, other = [], []
        own = set()
        for _, layer in lowrank_layers(model):
            for p in (layer.K, layer.L, layer.S):
                p.requires_grad_(True)
                factors.append(p)
                own.add(id(p))
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
                other.append(layer.bias)
                own.add(id(layer.bias))
        for n, p in model.named_parameters():
            if id(p) in own or n in head:
                continue
            p.requires_grad_(not freeze_other)
            if not freeze_other:
                other.append(p)
        groups = [{"params": factors, "name": "lowrank"}, {"params": other, "name": "other"}]
        return [g for g in groups if g["params"]]

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, cfg: TrainConfig) -> KLSOptimizer:
        """The KLS integrator driving ``optimizer`` (torch AdamW/SGD or a leantrain optimizer) for the factors."""
        return KLSOptimizer(model, inner=optimizer, tau=cfg.tau,
                            absolute_tau=bool(cfg.extra.get("dlrt_absolute_tau", False)),
                            recompute_s=bool(cfg.extra.get("dlrt_recompute_s", False)))

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """U, S, V (current ranks), biases, other trainable parameters and buffers -- never K, L."""
        return lowrank_state(model, trainable_only=True)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint taken at other ranks: factors are resized to the stored shapes."""
        load_lowrank_state(model, state)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Mean/min/max rank, inference parameter count and compression vs the dense layers, rank per layer."""
        info = model_params(model)
        ranks: dict[str, Any] = info["ranks"]
        out = {"dlrt/params": float(info["params"]), "dlrt/compression": float(info["compression"])}
        if ranks:
            vals = list(ranks.values())
            out.update({"dlrt/mean_rank": sum(vals) / len(vals), "dlrt/min_rank": float(min(vals)),
                        "dlrt/max_rank": float(max(vals))})
            out.update({f"dlrt/rank/{n}": float(r) for n, r in ranks.items()})
        return out


DLRT = register(DLRTMethod())
