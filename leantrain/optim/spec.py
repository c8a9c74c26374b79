"""Optimizer specs: what the trainer, the estimator, config validation and the CLI know about an optimizer,
declared once, by the module that implements it (``register(OptimizerSpec(...))`` at import time).

A spec builds the optimizer from the run's param groups and an options object -- anything with the attributes
of :class:`OptimizerOptions` (``leantrain.TrainConfig`` has them) -- so this package never imports the run
config or the CLI.
"""
from __future__ import annotations

import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..registry import Registry

CODEC_KINDS = ("native", "fp32", "bf16", "8bit", "4bit")
TASKS = ("classify", "causal-lm")


class OptimizerOptions(Protocol):
    """The run options a builder may read (attribute names of ``TrainConfig``)."""

    betas: tuple[float, float]
    weight_decay: float
    block_size: int
    compile_optim: bool
    rank: int
    gap: int
    proj_scale: float
    svd: str


Builder = Callable[[list[dict], OptimizerOptions, float], torch.optim.Optimizer]
MIN_QUANT_NUMEL = 4096  # min_8bit_size: a moment of fewer values stays fp32 under the 8/4-bit codecs
STEP_BYTES = 4  # the fp32 step counter every tensor's state holds


@dataclass(frozen=True)
class StateTensor:
    """What the memory estimator knows of one trainable tensor: its name, shape, and whether it sits in a group
    the optimizer's matrix rule takes (the method's "linear" weights or adapter matrices; not the task / output
    head, embeddings, norms)."""

    name: str
    shape: tuple[int, ...]
    matrix: bool


@dataclass(frozen=True)
class StateOptions:
    """The run settings a state-bytes rule reads: projection rank, codec block size, bytes of a plain moment
    (fp32, or bf16 under --state-dtype bf16), bytes of a projector basis value, the model's attention head width."""

    rank: int
    block_size: int
    elt: int
    basis_elt: int
    head_dim: int | None = None


# (state bytes including the step counter, projector bytes) of one tensor
StateBytes = Callable[[StateTensor, StateOptions], tuple[int, int]]


def codec_bytes(codec: str, numel: int, block_size: int, elt: int = 4) -> int:
    """Bytes of one moment of ``numel`` values: ``elt`` each when plain ("native"/"fp32"/"bf16"); 8/4-bit
    codes plus one fp32 absmax per block, or fp32 under ``MIN_QUANT_NUMEL`` values (Dettmers et al. 2022)."""
    if codec in ("native", "fp32", "bf16"):
        return numel * (2 if codec == "bf16" else elt)
    if numel < MIN_QUANT_NUMEL:
        return numel * 4
    per = numel if codec == "8bit" else (numel + 1) // 2
    return per + 4 * -(-numel // block_size)


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--optim`` name.

    ``states``: moments kept per parameter (estimator); ``codec``: how they are stored ("native" = in the
    parameter's dtype as torch does, else a leantrain codec); ``projected``: GaLore-style low-rank moments of 2-D
    parameters; ``compilable``: honours ``compile_optim`` (the fused 8/4-bit Adam kernel); ``options``: the run
    options it reads beyond lr, betas and weight_decay (the CLI warns about a given option nobody reads);
    ``low_rank_accumulation``: under ``--layerwise --grad-accum`` its projected matrices accumulate the r x n
    projected gradient (``accumulate_projected``), not the full one (estimator; checked against the optimizer).

    ``state_bytes``: the optimizer's own count of one tensor's state (:data:`StateBytes`) when ``states`` /
    ``codec`` / ``projected`` cannot say it (different rules for matrices and the rest, a fixed rank, compressed
    or factored moments); None: the estimator's generic rule from those three fields.

    ``lr_scale``: the default learning rate relative to AdamW's -- the run's default lr (the method's
    ``default_lr``, or the pre-training lr of ``--init-weights scratch``) times this; a mapping gives one scale
    per ``--task`` (tasks it leaves out: 1). Relative, because the method knows the scale of its parameters
    (LoRA 5e-4, full fine-tuning 5e-5) and the optimizer only how large its update is next to Adam's. Each
    optimizer's file says where its value comes from (paper or measurement).
    """

    name: str
    build: Builder
    states: int
    codec: str
    summary: str
    projected: bool = False
    compilable: bool = False
    options: tuple[str, ...] = ()
    low_rank_accumulation: bool = False
    lr_scale: float | Mapping[str, float] = 1.0
    state_bytes: StateBytes | None = None

    def lr_scale_for(self, task: str) -> float:
        """The default-lr factor of ``--task task``."""
        if isinstance(self.lr_scale, Mapping):
            return float(self.lr_scale.get(task, 1.0))
        return float(self.lr_scale)

    def __post_init__(self) -> None:
        if self.codec not in CODEC_KINDS:
            raise ValueError(f"optimizer spec {self.name!r}: codec={self.codec!r} is not one of {CODEC_KINDS}")
        if self.states < 0:
            raise ValueError(f"optimizer spec {self.name!r}: states={self.states} must be >= 0")
        scales = self.lr_scale if isinstance(self.lr_scale, Mapping) else {"*": self.lr_scale}
        for task, scale in scales.items():
            if task not in (*TASKS, "*") or not (isinstance(scale, (int, float)) and scale > 0):
                raise ValueError(f"optimizer spec {self.name!r}: lr_scale[{task!r}]={scale!r} must be a positive "
                                 f"number for a task in {TASKS}")



def _optimizer_modules() -> list[str]:
    """Every module of this package: an optimizer file registers its specs on import, so a new optimizer is
    just its file -- no list to extend."""
    return [f"{__package__}.{m.name}" for m in pkgutil.iter_modules([str(Path(__file__).parent)])]


REGISTRY: Registry[OptimizerSpec] = Registry("optimizer", _optimizer_modules)
register = REGISTRY.register
