"""LoRA-FA: LoRA with the down-projection A frozen at its random init; only B trains.

Paper: Zhang et al., *LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning*, 2023,
https://arxiv.org/abs/2308.03303. With A frozen, autograd keeps only the r-dimensional ``A x`` for B's gradient
instead of the layer input x, and A needs no gradient or optimizer state: half of LoRA's trainable parameters
(for square layers) and less activation memory, at the same adapter shape -- so the saved files are ordinary
PEFT LoRA files (A included) that PEFT and ``leantrain merge`` load as LoRA.

A is Kaiming-uniform (LoRA's default init) and B is zero, so the model starts unchanged; with ``--init gaussian``
A ~ N(0, 1/r). A is a deterministic function of the seed, so a resumed run rebuilds it exactly.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..config import TrainConfig
from ..methods import EstimatorTensor, register
from .inject import trainable_adapter_parameters
from .methods import ADAPTER_NAME, AdapterMethod, _lora


class LoraFAMethod(AdapterMethod):
    """``--method lora-fa``: inject LoRA, then freeze every ``lora_A``."""

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Any = None) -> list[dict]:
        super().apply(model, cfg, calib)
        trained = []
        for name, p in trainable_adapter_parameters(model, ADAPTER_NAME):
            frozen = name.rsplit(".", 1)[-1] == "lora_A"
            p.requires_grad_(not frozen)
            if not frozen:
                trained.append(p)
        return [{"params": trained, "name": "adapter"}]

    def validate(self, cfg: TrainConfig) -> None:
        if cfg.init not in ("default", "gaussian"):
            raise ValueError(f"TrainConfig.init={cfg.init!r}: LoRA-FA freezes a random A; use default or gaussian")
        if cfg.lora_plus_ratio is not None:
            raise ValueError("TrainConfig.lora_plus_ratio: LoRA+ scales B against A, but LoRA-FA does not train A")


def _tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    return [EstimatorTensor(module + ".lora_A", (cfg.rank, in_f), trains=False),
            EstimatorTensor(module + ".lora_B", (out_f, cfg.rank))]


LORA_FA = register(LoraFAMethod("lora-fa", _lora(), "LoRA-FA: LoRA with A frozen at its random init, only B trains",
                                _tensors, lambda out_f, in_f, rank: rank,
                                options=("rank", "alpha", "dropout", "targets", "init")))
