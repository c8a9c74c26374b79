"""Training-method objects for the adapter family (see leantrain/methods.py for the Method protocol).

Each object turns the flat TrainConfig fields (rank, alpha, dropout, targets, init, lora_plus_ratio, mask,
fraction, miss_variant, seed) into an adapter config, injects it as adapter "default" and returns the param
groups to optimise. LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) is a param-group split: B
(and, as in PEFT's ``create_loraplus_optimizer``, every 1-D adapter parameter such as DoRA's magnitude)
trains with ``lr * lora_plus_ratio`` and no weight decay. ``save_artifacts`` writes PEFT files to
``run_dir/adapter``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TrainConfig
from .inject import inject, trainable_adapter_parameters
from .io import save
from .lora import LoraConfig
from .vera import VeraConfig

ADAPTER_NAME = "default"


def parse_targets(targets: str) -> str | list[str]:
    """TrainConfig.targets -> target_modules: "all-linear", "re:<regex>" or a comma-separated name list."""
    text = targets.strip()
    if text == "all-linear" or text.startswith("re:"):
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"TrainConfig.targets={targets!r} names no module")
    return names


def loraplus_groups(named_params: list[tuple[str, nn.Parameter]], lr: float, ratio: float) -> list[dict]:
    """PEFT's LoRA+ split: B matrices and 1-D parameters get lr * ratio (1-D ones without weight decay)."""
    if ratio <= 0:
        raise ValueError(f"lora_plus_ratio={ratio!r} must be > 0")
    a, b, b_1d = [], [], []
    for name, p in named_params:
        if p.ndim == 1:
            b_1d.append(p)
        elif name.rsplit(".", 1)[-1] == "lora_B":
            b.append(p)
        else:
            a.append(p)
    groups = [
        {"params": a, "name": "lora_A"},
        {"params": b, "name": "lora_B", "lr": lr * ratio},
        {"params": b_1d, "name": "lora_B_1d", "lr": lr * ratio, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class AdapterMethod:
    """A Method built from a function ``TrainConfig -> adapter config``."""

    def __init__(
        self,
        name: str,
        build: Callable[[TrainConfig], Any],
        default_lr: float = 5e-4,
        lora_plus: bool = False,
    ) -> None:
        self.name, self.build, self.default_lr, self.lora_plus = name, build, default_lr, lora_plus

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Any = None) -> list[dict]:
        inject(model, self.build(cfg), ADAPTER_NAME, calib)
        named = trainable_adapter_parameters(model, ADAPTER_NAME)
        if self.lora_plus and cfg.lora_plus_ratio is not None:
            lr = cfg.lr if cfg.lr is not None else self.default_lr
            return loraplus_groups(named, lr, cfg.lora_plus_ratio)
        return [{"params": [p for _, p in named], "name": "adapter"}]

    def save_artifacts(self, model: nn.Module, run_dir: str | Path, cfg: TrainConfig) -> None:
        save(model, Path(run_dir) / "adapter", name=ADAPTER_NAME)

    def __repr__(self) -> str:
        return f"AdapterMethod({self.name!r})"


def _lora(**flags: Any) -> Callable[[TrainConfig], LoraConfig]:
    def build(cfg: TrainConfig) -> LoraConfig:
        init = cfg.init
        if flags.get("pissa") and init not in ("pissa", "pissa_fast"):
            init = "pissa"
        return LoraConfig(
            r=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules=parse_targets(cfg.targets),
            init=init,
            use_rslora=flags.get("use_rslora", False),
            use_dora=flags.get("use_dora", False),
        )

    return build


def _vera(cfg: TrainConfig) -> VeraConfig:
    return VeraConfig(
        r=cfg.rank,
        dropout=cfg.dropout,
        target_modules=parse_targets(cfg.targets),
        projection_prng_key=cfg.seed,
    )


def _miss(cfg: TrainConfig) -> Any:
    from .miss import MissConfig

    return MissConfig(r=cfg.rank, variant=cfg.miss_variant, target_modules=parse_targets(cfg.targets))


def _shira(cfg: TrainConfig) -> Any:
    from .shira import ShiraConfig

    return ShiraConfig(
        r=cfg.rank,
        fraction=cfg.fraction,
        mask=cfg.mask,
        target_modules=parse_targets(cfg.targets),
        seed=cfg.seed,
    )


LORA = AdapterMethod("lora", _lora(), lora_plus=True)
RSLORA = AdapterMethod("rslora", _lora(use_rslora=True), lora_plus=True)
DORA = AdapterMethod("dora", _lora(use_dora=True), lora_plus=True)
PISSA = AdapterMethod("pissa", _lora(pissa=True), default_lr=2e-4, lora_plus=True)
VERA = AdapterMethod("vera", _vera, default_lr=5e-3)
MISS = AdapterMethod("miss", _miss)
SHIRA = AdapterMethod("shira", _shira)
