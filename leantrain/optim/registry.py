"""Optimizer registry: ``--optim`` name -> :class:`~leantrain.optim.spec.OptimizerSpec`.

Each optimizer module registers its own specs when imported (see spec.py); this file only lists the modules,
so adding an optimizer is its file plus one entry in ``_MODULES``. Param groups arrive from the method
(``leantrain.methods``) plus the task head group (``name="head"``); builders may add keys to them (GaLore adds
``rank``/``update_proj_gap``/...).
"""
from __future__ import annotations

import importlib

import torch

from .spec import OptimizerOptions, OptimizerSpec, registered

_MODULES = ("adam", "lion", "sgd", "galore")  # each registers its specs on import


def specs() -> dict[str, OptimizerSpec]:
    """Every registered optimizer spec, by name."""
    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return registered()


def available_optimizers() -> list[str]:
    return sorted(specs())


def get_spec(name: str) -> OptimizerSpec:
    """The spec of ``name``; a one-line error listing the choices for an unknown name."""
    all_specs = specs()
    if name not in all_specs:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(all_specs))}")
    return all_specs[name]


def build_optimizer(name: str, groups: list[dict], options: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` with the run's ``options`` (e.g. a ``TrainConfig``)."""
    return get_spec(name).build(groups, options, lr)


def galore_groups(groups: list[dict], options: OptimizerOptions) -> list[dict]:
    """GaLore's param-group tagging (kept here for callers of the old registry API; lives in galore.py)."""
    from .galore import galore_groups as tag

    return tag(groups, options)
