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
from ..methods import EstimatorTensor, MethodBase, register
from .data_inits import DATA_INITS, LORA_GA
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


class AdapterMethod(MethodBase):
    """A Method built from a function ``TrainConfig -> adapter config``; ``tensors`` and ``act_per_token`` are
    its estimator terms per adapted Linear (see leantrain/methods.py)."""

    def __init__(
        self,
        name: str,
        build: Callable[[TrainConfig], Any],
        summary: str,
        tensors: Callable[[str, int, int, Any], list[EstimatorTensor]],
        act_per_token: Callable[[int, int, int], int] = lambda out_f, in_f, rank: 0,
        default_lr: float = 5e-4,
        lora_plus: bool = False,
        loftq: bool = False,
        data_inits: bool = False,
        extras: Callable[[list[tuple[str, int, int]], Any], dict[str, int]] = lambda targets, opts: {},
        options: tuple[str, ...] = ("rank", "targets"),
    ) -> None:
        self.name, self.build, self.summary, self.default_lr = name, build, summary, default_lr
        self.lora_plus, self.loftq, self.data_inits = lora_plus, loftq, data_inits
        self._tensors, self._act, self._extras = tensors, act_per_token, extras
        self.options = options  # the TrainConfig fields its adapter config reads (unread ones draw a CLI warning)

    def validate(self, cfg: TrainConfig) -> None:
        if cfg.init == "loftq" and not self.loftq:
            raise ValueError(f"TrainConfig.init='loftq' works with --method lora or rslora, not {self.name!r}")
        if cfg.init in DATA_INITS:
            if not self.data_inits:
                raise ValueError(f"TrainConfig.init={cfg.init!r} works with --method lora, rslora or dora, "
                                 f"not {self.name!r}")
            if cfg.init == LORA_GA and cfg.quantize:
                raise ValueError(f"TrainConfig.init='lora-ga' takes the gradient of full-precision weights; "
                                 f"drop --quantize {cfg.quantize}")
            LoraConfig(**lora_ga_options(cfg.extra))  # a bad --extra lora_ga_* value fails before the run starts

    def estimator_tensors(self, module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
        return self._tensors(module, out_f, in_f, cfg)

    def activation_bytes_per_token(self, out_f: int, in_f: int, rank: int, elt: int) -> int:
        return elt * self._act(out_f, in_f, rank)

    def estimator_extras(self, targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
        return self._extras(targets, opts)

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Any = None) -> list[dict]:
        inject(model, self.build(cfg), ADAPTER_NAME, calib)
        named = trainable_adapter_parameters(model, ADAPTER_NAME)
        if self.lora_plus and cfg.lora_plus_ratio is not None:
            lr = cfg.lr if cfg.lr is not None else self.default_lr
            return loraplus_groups(named, lr, cfg.lora_plus_ratio)
        return [{"params": [p for _, p in named], "name": "adapter"}]

    def save_artifacts(self, model: nn.Module, run_dir: str | Path, cfg: TrainConfig) -> None:
        save(model, Path(run_dir) / "adapter", name=ADAPTER_NAME)


def lora_ga_options(extra: dict[str, Any]) -> dict[str, Any]:
    """LoRA-GA's PEFT sub-options from TrainConfig.extra (``--extra lora_ga_scale=unit``), for LoraConfig."""
    return {k: extra[k] for k in ("lora_ga_direction", "lora_ga_scale", "lora_ga_gamma") if k in extra}


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
            **(lora_ga_options(cfg.extra) if init == LORA_GA else {}),
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


LORA_OPTIONS = ("rank", "alpha", "dropout", "targets", "init", "lora_plus_ratio")


# ---- estimator terms per adapted (out_f x in_f) Linear (Hu et al. 2021; Liu et al. 2024; Kopiczko et al. 2024;
# PEFT's MissConfig; SHiRA: K = r(out+in) or fraction*out*in values, their indices are counted by the estimator)
def _lora_tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    return [EstimatorTensor(module + ".lora_A", (cfg.rank, in_f)), EstimatorTensor(module + ".lora_B", (out_f, cfg.rank))]


def _dora_tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    return [*_lora_tensors(module, out_f, in_f, cfg), EstimatorTensor(module + ".lora_magnitude", (out_f,))]


def _vera_tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    return [EstimatorTensor(module + ".vera_lambda_d", (cfg.rank,)), EstimatorTensor(module + ".vera_lambda_b", (out_f,))]


def _miss_tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    return [EstimatorTensor(module + ".miss_block", (cfg.rank, out_f))]


def _vera_shared(targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
    """One frozen random A (r x in_max) and B (out_max x r) shared by every adapted layer."""
    in_max, out_max = max(t[2] for t in targets), max(t[1] for t in targets)
    return {"weights.vera_shared": (opts.rank * in_max + out_max * opts.rank) * opts.elt}


def _shira_indices(targets: list[tuple[str, int, int]], opts: Any) -> dict[str, int]:
    """Where each layer's K sparse values sit (``shira_index_bytes``: PEFT's or leantrain's layout)."""
    from ..memory.estimate import shira_index_bytes

    total = 0
    for module, out_f, in_f in targets:
        (values,) = _shira_tensors(module, out_f, in_f, opts)
        total += shira_index_bytes(values.shape[0], (out_f, in_f), opts.shira_layout)
    return {"weights.adapters": total}


def _shira_tensors(module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
    fraction = getattr(cfg, "fraction", None)
    k = int(fraction * out_f * in_f) if fraction else cfg.rank * (out_f + in_f)
    if k > out_f * in_f:
        raise ValueError(f"shira: r={cfg.rank} gives {k} entries > {out_f}x{in_f} of {module}; lower the rank")
    return [EstimatorTensor(module + ".shira_weight", (k,))]


LORA = register(AdapterMethod("lora", _lora(), "LoRA: trainable low-rank A, B beside each frozen Linear",
                              _lora_tensors, lambda o, i, r: r, lora_plus=True, loftq=True,
                              data_inits=True, options=LORA_OPTIONS))
RSLORA = register(AdapterMethod("rslora", _lora(use_rslora=True), "rsLoRA: LoRA scaled by alpha/sqrt(r)",
                                _lora_tensors, lambda o, i, r: r, lora_plus=True, loftq=True,
                                data_inits=True, options=LORA_OPTIONS))
DORA = register(AdapterMethod("dora", _lora(use_dora=True), "DoRA: LoRA direction + trainable magnitude",
                              _dora_tensors, lambda o, i, r: r + 2 * o, lora_plus=True, data_inits=True,
                              options=LORA_OPTIONS))
PISSA = register(AdapterMethod("pissa", _lora(pissa=True), "PiSSA: LoRA initialised from the top singular vectors",
                               _lora_tensors, lambda o, i, r: r, default_lr=2e-4, lora_plus=True,
                               options=LORA_OPTIONS))
VERA = register(AdapterMethod("vera", _vera, "VeRA: shared frozen random A, B; trainable scaling vectors",
                              _vera_tensors, lambda o, i, r: 2 * r + o, default_lr=5e-3, extras=_vera_shared,
                              options=("rank", "dropout", "targets")))
MISS = register(AdapterMethod("miss", _miss, "MiSS (Bone): trainable shared blocks of each weight",
                              _miss_tensors, lambda o, i, r: r, options=("rank", "targets", "miss_variant")))
SHIRA = register(AdapterMethod("shira", _shira, "SHiRA: a sparse trainable subset of each weight (--mask)",
                               _shira_tensors, extras=_shira_indices,
                               options=("rank", "targets", "mask", "fraction")))
