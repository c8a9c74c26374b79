"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024, https://arxiv.org/abs/2310.11454).

One pair of frozen random matrices is shared by every adapted layer of the model (A: r×in_max, B: out_max×r,
Kaiming-uniform from ``torch.Generator("cpu").manual_seed(projection_prng_key)``, A drawn first, as PEFT);
each layer trains only two vectors:  y = W x + λ_b ⊙ B[:out] (λ_d ⊙ A[:, :in] dropout(x)),
ΔW = diag(λ_b) B_l diag(λ_d) A_l.  λ_d starts at d_initial (0.1), λ_b at 0, so the output starts unchanged.
The shared pair is regenerated from the seed, so it costs no checkpoint space; PEFT files carry it as
``base_model.vera_A`` / ``base_model.vera_B`` when ``save_projection`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, base_weight
from .config_fields import get_bool, get_float, get_int
from .lora import adapter_dtype
from .registry import register_adapter


class VeraProjection:
    """The shared frozen pair; moved lazily to the device of the input (one copy for all layers)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a.device != device or self.a.dtype != dtype:
            self.a, self.b = self.a.to(device, dtype), self.b.to(device, dtype)
        return self.a, self.b


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform, gain √2, fan_in = shape[1], drawn from ``generator`` (PEFT's ``_kaiming_init``)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@dataclass
class VeraConfig:
    """VeRA adapter. ``r`` is the shared projection rank (paper default 256); trainable per layer: r + out."""

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    projection_prng_key: int = 0
    save_projection: bool = True  # store vera_A / vera_B in the adapter file (PEFT default)
    dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True  # False: λ_b = λ_d = 1 (output differs from base at init; for tests)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"VeraConfig.r={self.r!r} must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"VeraConfig.dropout={self.dropout!r} must be in [0, 1)")

    def prepare(self, model: nn.Module, targets: list[str], calib: Any = None) -> None:
        """Draw the shared pair sized to the largest targeted layer (called by inject before wrapping)."""
        dims = [(model.get_submodule(t).in_features, model.get_submodule(t).out_features) for t in targets]
        in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
        gen = torch.Generator(device="cpu").manual_seed(self.projection_prng_key)
        a = kaiming_uniform((self.r, in_max), gen)
        b = kaiming_uniform((out_max, self.r), gen)
        self._projection = VeraProjection(a, b)

    def to_peft_dict(self, targets: list[str]) -> dict[str, Any]:
        return {
            "r": self.r,
            "target_modules": targets,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "init_weights": self.init_weights,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "VeraConfig":
        for key, ok in [("bias", "none"), ("fan_in_fan_out", False), ("layers_to_transform", None)]:
            if d.get(key, ok) != ok:
                raise ValueError(
                    f"adapter_config.json: {key}={d[key]!r} is not supported by leantrain's VeRA"
                )
        targets = d.get("target_modules") or "all-linear"
        if isinstance(targets, str) and targets != "all-linear":
            targets = "re:" + targets.removeprefix("re:")
        return cls(
            r=get_int(d, "r", 256, "VeRA", minimum=1),
            target_modules=targets,
            projection_prng_key=get_int(d, "projection_prng_key", 0, "VeRA"),
            save_projection=get_bool(d, "save_projection", True, "VeRA"),
            dropout=get_float(d, "vera_dropout", 0.0, "VeRA"),
            d_initial=get_float(d, "d_initial", 0.1, "VeRA"),
            init_weights=get_bool(d, "init_weights", True, "VeRA"),
        )


class VeraParams(nn.Module):
    def __init__(
        self,
        r: int,
        n_out: int,
        dropout: float,
        projection: VeraProjection,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.lambda_b = nn.Parameter(torch.zeros(n_out, dtype=dtype, device=device))
        self.lambda_d = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = projection  # shared, not registered: one copy per model, not per layer


class VeraLinear(AdapterLayer):
    peft_keys = {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"}

    def create_adapter(self, name: str, config: VeraConfig) -> nn.Module:
        projection = getattr(config, "_projection", None)
        if projection is None:
            raise ValueError(
                "VeraConfig.prepare was not called; add VeRA adapters with leantrain.adapters.inject"
            )
        weight = base_weight(self.base_layer)
        p = VeraParams(
            config.r, self.out_features, config.dropout, projection, adapter_dtype(weight), weight.device
        )
        with torch.no_grad():
            if config.init_weights:
                p.lambda_d.fill_(config.d_initial)
            else:
                p.lambda_b.fill_(1.0)
                p.lambda_d.fill_(1.0)
        return p

    def _slices(self, p: VeraParams) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = p.projection.on(p.lambda_d.device, p.lambda_d.dtype)
        return a[:, : self.in_features], b[: self.out_features, :]

    def delta_weight(self, name: str) -> torch.Tensor:
        p = self.adapters[name]
        a, b = self._slices(p)
        delta = (p.lambda_b[:, None] * b) @ (p.lambda_d[:, None] * a)
        return delta.to(base_weight(self.base_layer).dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        a, b = self._slices(p)
        x = x.to(p.lambda_d.dtype)
        return p.lambda_b * F.linear(p.lambda_d * F.linear(p.dropout(x), a), b)

    def shared_state(self, name: str) -> dict[str, torch.Tensor]:
        p = self.adapters[name]
        if not self.configs[name].save_projection:
            return {}
        return {"vera_A": p.projection.a, "vera_B": p.projection.b}

    def load_shared_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        p = self.adapters[name]
        unexpected = sorted(set(tensors) - {"vera_A", "vera_B"})
        if unexpected:
            raise KeyError(
                f"unexpected model-level key(s) {['base_model.' + k for k in unexpected]} for VeRA"
            )
        for key, own in (("vera_A", p.projection.a), ("vera_B", p.projection.b)):
            if key not in tensors:
                continue  # save_projection=False: keep the pair regenerated from projection_prng_key
            value = tensors[key]
            if tuple(value.shape) != tuple(own.shape):
                raise ValueError(
                    f"shape mismatch for base_model.{key}: file has {tuple(value.shape)}, "
                    f"model expects {tuple(own.shape)}"
                )
        if "vera_A" in tensors:
            p.projection.a = tensors["vera_A"].to(p.projection.a)
        if "vera_B" in tensors:
            p.projection.b = tensors["vera_B"].to(p.projection.b)


register_adapter(VeraConfig, VeraLinear)
