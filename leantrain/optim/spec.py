"""Optimizer specs: what the trainer, the estimator, config validation and the CLI know about an optimizer,
declared once, by the module that implements it (``register(OptimizerSpec(...))`` at import time).

A spec builds the optimizer from the run's param groups and an options object -- anything with the attributes
of :class:`OptimizerOptions` (``leantrain.TrainConfig`` has them) -- so this package never imports the run
config or the CLI.
"""
from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..registry import Registry

CODEC_KINDS = ("native", "fp32", "bf16", "8bit", "4bit")


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


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--optim`` name.

    ``states``: moments kept per parameter (estimator); ``codec``: how they are stored ("native" = in the
    parameter's dtype as torch does, else a leantrain codec); ``projected``: GaLore-style low-rank moments of 2-D
    parameters; ``compilable``: honours ``compile_optim`` (the fused 8/4-bit Adam kernel); ``options``: the run
    options it reads beyond lr, betas and weight_decay (the CLI warns about a given option nobody reads);
    ``low_rank_accumulation``: under ``--layerwise --grad-accum`` its projected matrices accumulate the r x n
    projected gradient (``accumulate_projected``), not the full one (estimator; checked against the optimizer).
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

    def __post_init__(self) -> None:
        if self.codec not in CODEC_KINDS:
            raise ValueError(f"optimizer spec {self.name!r}: codec={self.codec!r} is not one of {CODEC_KINDS}")
        if self.states < 0:
            raise ValueError(f"optimizer spec {self.name!r}: states={self.states} must be >= 0")



def _optimizer_modules() -> list[str]:
    """Every module of this package: an optimizer file registers its specs on import, so a new optimizer is
    just its file -- no list to extend."""
    return [f"{__package__}.{m.name}" for m in pkgutil.iter_modules([str(Path(__file__).parent)])]


REGISTRY: Registry[OptimizerSpec] = Registry("optimizer", _optimizer_modules)
register = REGISTRY.register
