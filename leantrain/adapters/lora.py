"""LoRA and its variants: rsLoRA scaling, DoRA, PiSSA init (one config, one layer per module type).

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685):  y = W x + s·B A dropout(x),  s = alpha / r.
rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732): s = alpha / sqrt(r), rank-stable updates.
DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): y = (m / ||W + s·BA||_row) ⊙ (W + s·BA) x + b with
  the norm detached (paper §4.3); m starts at ||W||_row. Supported on Linear.
PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): A, B start as the top-r singular triplets of W
  and W is replaced by the residual, so the output is unchanged at init. "pissa_fast" uses torch.svd_lowrank.
LoRA-GA / CorDA ("lora-ga", "corda-kpm", "corda-ipm"): A, B start from an SVD computed over calibration batches
  (``inject(..., calib=fn)``), W becomes the residual as for PiSSA; the math is in leantrain/adapters/data_inits.py.
Formulas, key names and defaults follow /work/shared/methods/lora_family.md (PEFT's LoRA).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, base_weight, layer_shape, set_base_weight
from .config_fields import get_bool, get_dict, get_float, get_int
from .data_inits import CORDA_KPM, DATA_INITS, GA_DIRECTIONS, GA_SCALES, LORA_GA, collect, data_factors
from .registry import register_adapter

LORA_INITS = ("default", "gaussian", "pissa", "pissa_fast", "random", *DATA_INITS)
RESIDUAL_INITS = ("pissa", "pissa_fast", *DATA_INITS)  # inits that rewrite W into a residual
INITIAL_NAME = "initial_adapter.safetensors"  # a data init's A0, B0 beside adapter_model.safetensors


@dataclass
class LoraConfig:
    """One LoRA adapter. ``init``: "default" (Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B),
    "pissa" (exact SVD), "pissa_fast" (randomized SVD, ``pissa_niter`` power iterations) or "random" (B random
    too: output differs from the base at init, used by tests), or from calibration data: "lora-ga", "corda-kpm",
    "corda-ipm" (``inject(..., calib=fn)``; ``lora_ga_*`` are PEFT's ``LoraGAConfig`` fields)."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = "all-linear"  # names (suffix match), "re:<regex>" or "all-linear"
    exclude_modules: str | list[str] | None = None  # None = skip the task head for all-linear / regex targets
    dropout: float = 0.0
    use_rslora: bool = False  # s = alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False
    init: str = "default"
    pissa_niter: int = 4  # power iterations of the fast randomized SVD (PEFT's "pissa_niter_<k>")
    lora_ga_direction: str = "ArB2r"  # which gradient singular vectors go to A and B (PEFT's LoraGAConfig)
    lora_ga_scale: str = "stable"  # stable | weight_svd | gd_scale | unit
    lora_ga_gamma: float = 16  # gamma of the "stable" scale
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name regex -> r (PEFT semantics)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name regex -> alpha

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        for key, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ValueError(f"LoraConfig.{key}={r!r} must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout={self.dropout!r} must be in [0, 1)")
        if self.init not in LORA_INITS:
            raise ValueError(f"LoraConfig.init={self.init!r}; choose one of {', '.join(LORA_INITS)}")
        if self.pissa_niter < 0:
            raise ValueError(f"LoraConfig.pissa_niter={self.pissa_niter!r} must be >= 0")
        for key, value, allowed in [("lora_ga_direction", self.lora_ga_direction, GA_DIRECTIONS),
                                    ("lora_ga_scale", self.lora_ga_scale, GA_SCALES)]:
            if value not in allowed:
                raise ValueError(f"LoraConfig.{key}={value!r}; choose one of {', '.join(allowed)}")
        gamma = self.lora_ga_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"LoraConfig.lora_ga_gamma={self.lora_ga_gamma!r} must be > 0")
        self._stats: dict[str, torch.Tensor] = {}  # per-layer gradient / covariance of a data init
        self._initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # from a file: initial A0, B0

    @property
    def changes_base(self) -> bool:
        """The init rewrites W into a residual (PiSSA, LoRA-GA, CorDA): the adapter belongs to that residual."""
        return self.init in RESIDUAL_INITS

    def prepare(self, model: nn.Module, targets: list[str], calib: Any) -> None:
        """inject() hook: a data init computes each target's gradient / input covariance before any layer changes.
        A config read from a file (``_initial`` set) takes its initial factors from the file instead."""
        if self.init in DATA_INITS and self._initial is None:
            self._stats = collect(model, targets, calib, self.init)

    def rank_alpha(self, layer_name: str) -> tuple[int, float]:
        """r and alpha of one layer after rank_pattern / alpha_pattern (PEFT: regex matching a suffix)."""

        def lookup(patterns: dict, default: Any) -> Any:
            for key, value in patterns.items():
                if re.match(rf"(.*\.)?({key})$", layer_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), float(lookup(self.alpha_pattern, self.alpha))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- PEFT adapter_config.json mapping ------------------------------------------------------------------
    def to_peft_dict(self, targets: list[str]) -> dict[str, Any]:
        init = {
            "default": True,
            "gaussian": "gaussian",
            "pissa": "pissa",
            "random": False,
            "pissa_fast": f"pissa_niter_{self.pissa_niter}",
            LORA_GA: "lora_ga",
        }.get(self.init, True)  # CorDA: PEFT cannot load init "corda" without preprocess_corda; corda_config says it
        sub: dict[str, Any] = {}
        if self.init == LORA_GA:
            sub["lora_ga_config"] = {"direction": self.lora_ga_direction, "scale": self.lora_ga_scale,
                                     "stable_gamma": self.lora_ga_gamma}
        elif self.init in DATA_INITS:
            sub["corda_config"] = {"corda_method": "kpm" if self.init == CORDA_KPM else "ipm", "cache_file": None,
                                   "covariance_file": None, "verbose": False, "use_float16_for_covariance": False,
                                   "prune_temporary_fields": True}
        return sub | {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets,
            "exclude_modules": None,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": init,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "lora_bias": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        unsupported = [
            ("bias", "none"),
            ("fan_in_fan_out", False),
            ("lora_bias", False),
            ("layers_to_transform", None),
            ("use_qalora", False),
            ("layer_replication", None),
            ("target_parameters", None),
            ("trainable_token_indices", None),
        ]
        for key, ok in unsupported:
            if d.get(key, ok) not in (ok, [], {}):
                raise ValueError(
                    f"adapter_config.json: {key}={d[key]!r} is not supported by leantrain's LoRA"
                )
        init, niter, ga = _init_from_peft(d)
        targets = d.get("target_modules") or "all-linear"
        if isinstance(targets, str) and targets != "all-linear":
            targets = "re:" + targets.removeprefix("re:")
        exclude = d.get("exclude_modules")
        if isinstance(exclude, str):
            exclude = "re:" + exclude.removeprefix("re:")
        config = cls(
            r=get_int(d, "r", 8, "LoRA", minimum=1),
            alpha=get_float(d, "lora_alpha", 8, "LoRA"),
            target_modules=targets,
            exclude_modules=exclude,
            dropout=get_float(d, "lora_dropout", 0.0, "LoRA"),
            use_rslora=get_bool(d, "use_rslora", False, "LoRA"),
            use_dora=get_bool(d, "use_dora", False, "LoRA"),
            init=init,
            pissa_niter=niter,
            rank_pattern=get_dict(d, "rank_pattern", "LoRA"),
            alpha_pattern=get_dict(d, "alpha_pattern", "LoRA"),
            **ga,
        )
        if config.init in DATA_INITS:
            config._initial = {}  # from a file: no calibration; initial factors only if the folder has them
        return config


def _init_from_peft(d: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """(leantrain init, pissa_niter, LoRA-GA fields) of PEFT's ``init_lora_weights`` and its sub-config."""
    init = d.get("init_lora_weights", True)
    niter, ga = 4, {}
    if init == "corda" or (init is True and get_dict(d, "corda_config", "LoRA")):
        sub = get_dict(d, "corda_config", "LoRA")
        method = sub.get("corda_method", "ipm")  # PEFT's CordaConfig default
        if method not in ("ipm", "kpm"):
            raise ValueError(f"adapter_config.json: corda_config.corda_method={method!r} must be 'ipm' or 'kpm'")
        init = f"corda-{method}"
    elif init is True:
        init = "default"
    elif init is False:
        init = "random"
    elif isinstance(init, str) and init.startswith("pissa_niter_"):
        init, niter = "pissa_fast", int(init.removeprefix("pissa_niter_"))
    elif init == "lora_ga":
        sub = get_dict(d, "lora_ga_config", "LoRA")
        init, ga = LORA_GA, {"lora_ga_direction": sub.get("direction", "ArB2r"),
                             "lora_ga_scale": sub.get("scale", "stable"),
                             "lora_ga_gamma": get_float(sub, "stable_gamma", 16, "LoRA-GA")}
    elif init not in ("gaussian", "pissa"):
        raise ValueError(f"adapter_config.json: init_lora_weights={init!r} is not supported by leantrain")
    return init, niter, ga


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on a half-precision base (PEFT's autocast_adapter_dtype), else in W's dtype."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoraParams(nn.Module):
    """Tensors of one LoRA adapter: ``lora_A`` (r, in), ``lora_B`` (out, r), optional DoRA ``magnitude``."""

    def __init__(
        self,
        r: int,
        n_in: int,
        n_out: int,
        scaling: float,
        dropout: float,
        dora: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, n_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(n_out, r, dtype=dtype, device=device))
        self.magnitude = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if dora else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


class LoraLinear(AdapterLayer):
    """LoRA / rsLoRA / DoRA / PiSSA on nn.Linear (or a quantized Linear with ``dequantize()``)."""

    peft_keys: ClassVar[dict[str, str]] = {
        "lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"
    }

    def create_adapter(self, name: str, config: LoraConfig) -> nn.Module:
        where = getattr(self, "layer_name", type(self.base_layer).__name__)
        r, alpha = config.rank_alpha(where)
        n_in, n_out = self.in_features, self.out_features
        # PiSSA takes r singular triplets, so r <= min(in, out). Plain LoRA allows any r (as PEFT does: a
        # converted PiSSA adapter has rank 2r), although ranks above min(in, out) add no expressiveness.
        if config.init in ("pissa", "pissa_fast") and r > min(n_in, n_out):
            raise ValueError(
                f"PiSSA r={r} exceeds min(in, out)={min(n_in, n_out)} of layer {where!r} ({n_in}->{n_out})"
            )
        weight = base_weight(self.base_layer)
        p = LoraParams(
            r,
            n_in,
            n_out,
            config.scaling(r, alpha),
            config.dropout,
            config.use_dora,
            adapter_dtype(weight),
            weight.device,
        )
        with torch.no_grad():
            if config.init in ("pissa", "pissa_fast"):
                pissa_init(self.base_layer, p, niter=None if config.init == "pissa" else config.pissa_niter)
            elif config.init in DATA_INITS:
                data_init(self.base_layer, p, config, where)
            else:
                init_lora(p.lora_A, p.lora_B, config.init)
            if p.magnitude is not None:
                w = base_weight(self.base_layer).to(p.lora_A.dtype)
                p.magnitude.copy_(torch.linalg.norm(w + p.scaling * (p.lora_B @ p.lora_A), dim=1))
        return p

    def delta_weight(self, name: str) -> torch.Tensor:
        p = self.adapters[name]
        dtype = base_weight(self.base_layer).dtype
        return (p.scaling * (p.lora_B @ p.lora_A)).to(dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        x = x.to(p.lora_A.dtype)
        dx = p.dropout(x)
        lora = F.linear(F.linear(dx, p.lora_A), p.lora_B) * p.scaling
        if p.magnitude is None:
            return lora
        w = base_weight(self.base_layer).to(x.dtype)
        norm = torch.linalg.norm(w + p.scaling * (p.lora_B @ p.lora_A).detach(), dim=1).detach()
        scale = p.magnitude / norm
        if isinstance(p.dropout, nn.Identity) or not self.training:
            wx = base_out.to(x.dtype)
            if self.bias is not None:
                wx = wx - self.bias.to(x.dtype)
        else:  # PEFT recomputes the base term on the dropped-out input
            wx = F.linear(dx, w)
        return (scale - 1) * wx + scale * lora

    def merge_one(self, name: str) -> None:
        p = self.adapters[name]
        if p.magnitude is None:
            return super().merge_one(name)
        w = base_weight(self.base_layer)
        full = w.to(p.lora_A.dtype) + p.scaling * (p.lora_B @ p.lora_A)
        norm = torch.linalg.norm(full, dim=1)
        p.merged_norm = norm.detach().clone()  # unmerge needs the norm used here (spec §3 pitfall)
        set_base_weight(self.base_layer, ((p.magnitude / norm)[:, None] * full).to(w.dtype))

    def unmerge_one(self, name: str) -> None:
        p = self.adapters[name]
        if p.magnitude is None:
            return super().unmerge_one(name)
        w = base_weight(self.base_layer)
        factor = (p.magnitude / p.merged_norm)[:, None]
        restored = w.to(p.lora_A.dtype) / factor - p.scaling * (p.lora_B @ p.lora_A)
        set_base_weight(self.base_layer, restored.to(w.dtype))
        del p.merged_norm


class LoraEmbedding(AdapterLayer):
    """LoRA on nn.Embedding: ΔW = s·(B A)^T with A (r, num_embeddings), B (dim, r) (PEFT's layout)."""

    peft_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def create_adapter(self, name: str, config: LoraConfig) -> nn.Module:
        where = getattr(self, "layer_name", "embedding")
        r, alpha = config.rank_alpha(where)
        num, dim = layer_shape(self.base_layer)
        if config.use_dora or config.init in RESIDUAL_INITS:
            raise TypeError(
                f"{where!r}: DoRA, PiSSA, LoRA-GA and CorDA are implemented for Linear layers only, not nn.Embedding"
            )
        weight = self.base_layer.weight
        p = LoraParams(
            r, num, dim, config.scaling(r, alpha), 0.0, False, adapter_dtype(weight), weight.device
        )
        with (
            torch.no_grad()
        ):  # PEFT: A zeros, B normal (reversed w.r.t. Linear) so the output starts unchanged
            if config.init == "random":
                nn.init.normal_(p.lora_A)
            else:
                nn.init.zeros_(p.lora_A)
            nn.init.normal_(p.lora_B)
        return p

    def delta_weight(self, name: str) -> torch.Tensor:
        p = self.adapters[name]
        return (p.scaling * (p.lora_B @ p.lora_A).T).to(self.base_layer.weight.dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        e = self.base_layer
        after_a = F.embedding(
            x, p.lora_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
        )
        return (after_a @ p.lora_B.T) * p.scaling


def init_lora(a: torch.Tensor, b: torch.Tensor, how: str) -> None:
    """PEFT's Linear init: Kaiming-uniform(a=√5) or N(0, 1/r) A and zero B; "random" leaves B random too."""
    if how == "gaussian":
        nn.init.normal_(a, std=1 / a.shape[0])
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if how == "random":
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


def pissa_init(base: nn.Module, p: LoraParams, niter: int | None) -> None:
    """Top-r SVD of W into A, B (scaled so s·BA is the rank-r part) and write the residual back into W."""
    wf = base_weight(base).to(torch.float32)
    r, s = p.r, p.scaling
    if niter is None:
        v, sig, uh = torch.linalg.svd(wf, full_matrices=False)
        v, sig, uh = v[:, :r], sig[:r], uh[:r]
    else:
        with torch.random.fork_rng(devices=[wf.device] if wf.device.type == "cuda" else []):
            torch.manual_seed(0)  # deterministic, so loading a saved PiSSA adapter rebuilds the same residual
            v, sig, u = torch.svd_lowrank(wf, q=r, niter=niter)
        uh = u.T
    root = torch.sqrt(sig / s)
    start_from(base, p, root[:, None] * uh, v * root[None, :])


def start_from(base: nn.Module, p: LoraParams, a: torch.Tensor, b: torch.Tensor) -> None:
    """A, B := a, b and W := W - s·B A (in fp32, from A and B in the adapter's dtype, as PEFT does).

    The initial factors stay as buffers ``init_A0`` / ``init_B0`` (not in the state dict): the conversion to a
    plain LoRA against the original W (``save(..., pissa_to_lora=True)``) and a data init's saved initial
    factors read them.
    """
    w = base_weight(base)
    p.lora_A.copy_(a.to(p.lora_A.dtype))
    p.lora_B.copy_(b.to(p.lora_B.dtype))
    p.register_buffer("init_A0", p.lora_A.detach().clone(), persistent=False)
    p.register_buffer("init_B0", p.lora_B.detach().clone(), persistent=False)
    delta = p.scaling * (p.lora_B.float() @ p.lora_A.float())
    set_base_weight(base, (w.to(torch.float32) - delta).to(w.dtype))


def data_init(base: nn.Module, p: LoraParams, config: LoraConfig, where: str) -> None:
    """LoRA-GA / CorDA for one layer: from the statistic ``prepare`` collected, or from a file's initial factors.

    A config read from a PEFT file without initial factors leaves W alone (PEFT's convention: the model it loads
    into already holds the residual) and starts A, B as plain LoRA; the file's tensors overwrite them.
    """
    if config._initial is not None:
        if not config._initial:
            init_lora(p.lora_A, p.lora_B, "default")
            return
        if where not in config._initial:
            raise ValueError(f"{INITIAL_NAME} has no initial factors for layer {where!r}")
        a, b = config._initial[where]
        if tuple(a.shape) != tuple(p.lora_A.shape) or tuple(b.shape) != tuple(p.lora_B.shape):
            raise ValueError(f"{INITIAL_NAME}: initial factors of {where!r} have shapes {tuple(a.shape)}, "
                             f"{tuple(b.shape)}; the adapter needs {tuple(p.lora_A.shape)}, {tuple(p.lora_B.shape)}")
        return start_from(base, p, a, b)
    stat = config._stats.pop(where, None)
    if stat is None:
        raise ValueError(f"--init {config.init} for layer {where!r} needs calibration batches: "
                         "inject(..., calib=fn) where fn(model) yields scalar losses")
    a, b = data_factors(base, stat, config.init, p.r, p.scaling, config, where)
    start_from(base, p, a, b)


# LoraConv2d builds on this file, so it is named, not imported: the registry imports lora_conv on first use.
register_adapter(
    LoraConfig,
    LoraLinear,
    extra_layers={nn.Embedding: LoraEmbedding, nn.Conv2d: "leantrain.adapters.lora_conv:LoraConv2d"},
)
