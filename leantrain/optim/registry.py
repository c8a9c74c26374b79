"""Optimizer registry: name -> builder(param_groups, cfg, lr) -> torch.optim.Optimizer.

Builders import their optimizer lazily, so the CLI starts fast and a missing optional piece fails with a
message naming the optimizer. Param groups arrive from the method (``leantrain.methods``) plus the task head
group (``name="head"``); builders may add keys to them (GaLore adds ``rank``/``update_proj_gap``/...).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..config import TrainConfig

Builder = Callable[[list[dict], TrainConfig, float], torch.optim.Optimizer]


def _cls(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _projected(groups: list[dict]) -> bool:
    return any(g.get("rank") is not None for g in groups)


def _low_precision(groups: list[dict]) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16) for g in groups for p in g["params"])


def build_adamw(groups: list[dict], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW, unless a group asks for gradient projection or a parameter is fp16/bf16: then leantrain's
    AdamW, whose moments stay fp32 (torch keeps them in the parameter's dtype, where an fp16 second moment
    underflows to 0 and the step becomes NaN)."""
    if _projected(groups) or _low_precision(groups):
        return _cls("leantrain.optim.adam:AdamW")(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _adam_like(path: str) -> Builder:
    def build(groups: list[dict], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
        extra = {"compile": True} if cfg.compile_optim else {}
        return _cls(path)(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, block_size=cfg.block_size,
                          **extra)

    return build


def galore_groups(groups: list[dict], cfg: TrainConfig) -> list[dict]:
    """Tag the method's ``linear`` groups (or all non-head groups) with GaLore keys; others stay dense."""
    tagged = []
    for g in groups:
        g = dict(g)
        # "lowrank" = DLRT factors, which are already low-rank and follow their own integrator
        wants = g.get("name") == "linear" or (g.get("name") not in ("head", "other", "lowrank")
                                              and g.get("rank") is None)
        if wants and g.get("rank") is None:
            mats = [p for p in g["params"] if p.ndim == 2 and min(p.shape) > cfg.rank]
            rest = [p for p in g["params"] if not (p.ndim == 2 and min(p.shape) > cfg.rank)]
            if mats:
                tagged.append({**g, "params": mats, "rank": cfg.rank, "update_proj_gap": cfg.gap,
                               "scale": cfg.proj_scale, "proj_type": "std", "svd": cfg.svd})
            if rest:
                tagged.append({**g, "params": rest})
        else:
            tagged.append(g)
    return tagged


def _galore(path: str, adam_like: bool = True) -> Builder:
    inner = _adam_like(path)

    def build(groups: list[dict], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
        return inner(galore_groups(groups, cfg), cfg, lr)

    return build


def build_sgd8bit(groups: list[dict], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return _cls("leantrain.optim.sgd:SGD8bit")(groups, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay,
                                               block_size=cfg.block_size)


def build_lion8bit(groups: list[dict], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return _cls("leantrain.optim.lion:Lion8bit")(groups, lr=lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                                                 block_size=cfg.block_size)


OPTIMIZERS: dict[str, Builder] = {
    "adamw": build_adamw,
    "adamw8bit": _adam_like("leantrain.optim.adam:AdamW8bit"),
    "adam8bit": _adam_like("leantrain.optim.adam:Adam8bit"),
    "adamw4bit": _adam_like("leantrain.optim.adam:AdamW4bit"),
    "lion8bit": build_lion8bit,
    "sgd8bit": build_sgd8bit,
    "galore-adamw": _galore("leantrain.optim.adam:AdamW"),
    "galore-adamw8bit": _galore("leantrain.optim.adam:AdamW8bit"),
    "galore-adamw4bit": _galore("leantrain.optim.adam:AdamW4bit"),
}


def available_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def build_optimizer(name: str, groups: list[dict], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(available_optimizers())}")
    try:
        return OPTIMIZERS[name](groups, cfg, lr)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ValueError(f"optimizer {name!r} is registered but not importable: {exc}") from exc
