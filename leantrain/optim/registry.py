"""Optimizer registry: ``--optim`` name -> :class:`~leantrain.optim.spec.OptimizerSpec`.

Each optimizer module registers its own specs when imported (spec.py imports every module of the package), so
adding an optimizer is just its file. Param groups arrive from the method (``leantrain.methods``) plus the task
head group (``name="head"``); builders may add keys to them (GaLore adds ``rank``/``update_proj_gap``/...).
"""
from __future__ import annotations

import torch

from .spec import REGISTRY, OptimizerOptions

specs = REGISTRY.all
available_optimizers = REGISTRY.names
get_spec = REGISTRY.get


def build_optimizer(name: str, groups: list[dict], options: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` with the run's ``options`` (e.g. a ``TrainConfig``)."""
    return get_spec(name).build(groups, options, lr)


def galore_groups(groups: list[dict], options: OptimizerOptions) -> list[dict]:
    """GaLore's param-group tagging (kept here for callers of the old registry API; lives in galore.py)."""
    from .galore import galore_groups as tag

    return tag(groups, options)
