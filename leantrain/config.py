"""TrainConfig: every knob of a training run, as one flat dataclass saved to ``config.json``.

Flat on purpose: the CLI maps one flag to one field, and a run folder's config.json can be edited by hand and
fed back with ``leantrain train --config``. Method-specific fields are ignored by methods that do not use them.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def compilable_optimizers() -> tuple[str, ...]:
    """``--optim`` names whose spec honours ``compile_optim`` (declared by each optimizer's own module)."""
    from .optim.registry import specs

    return tuple(name for name, spec in sorted(specs().items()) if spec.compilable)


@dataclass
class TrainConfig:
    # --- what to train on -------------------------------------------------------------------------------------
    task: str = "classify"  # "classify" (sentence classification) | "causal-lm"
    model: str = "minilm"  # "minilm" (embedded MiniLM-L6), "tiny" (random 2-layer BERT, for tests) or a folder
    data: str | None = None  # "vader" | "bible" | a .csv/.jsonl (.txt for causal-lm); None = vader / bible (LM)
    val_data: str | None = None  # optional separate validation file; else a deterministic split of `data`
    train_size: int | None = 4000  # stratified subset of the training split (None = all of it)
    val_size: int | None = 1000  # subset of the validation split (None = all of it)
    max_length: int = 64  # tokens per sentence
    model_dropout: float | None = None  # override the model's own dropout (0 makes runs batch-split invariant)
    # --- how to train -----------------------------------------------------------------------------------------
    method: str = "lora"  # registry name, see leantrain.methods.available_methods()
    optim: str = "adamw"  # registry name, see leantrain.optim.available_optimizers()
    lr: float | None = None  # None = the method's default learning rate
    head_lr: float | None = None  # lr of the fresh task head; None = max(lr, 1e-3)
    weight_decay: float = 0.01  # decoupled weight decay (AdamW-style)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    epochs: float | None = None  # train for this many passes over the data ...
    steps: int | None = None  # ... or exactly this many optimizer steps (wins over epochs); default 1 epoch
    batch_size: int = 16  # sentences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.06  # linear warm-up, then linear decay to 0
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    nan_policy: str = "stop"  # "stop" | "skip": what to do when the loss or a gradient is not finite
    seed: int = 0  # seeds head init, adapter init, dropout and batch order (not the data split)
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    strategy: str = "auto"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard); "auto" = ddp
    # --- adapters (LoRA family, VeRA, MiSS, SHiRA) -------------------------------------------------------------
    rank: int = 8  # adapter rank r (LoRA family, VeRA), block size (MiSS), projection rank (GaLore), DLRT max rank
    alpha: float = 16.0  # LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) for rslora)
    dropout: float = 0.0  # dropout on the adapter input
    targets: str = "all-linear"  # "all-linear", comma-separated module names, or a regex (prefix "re:")
    init: str = "default"  # LoRA init: default | gaussian | pissa | pissa_fast | loftq (needs --quantize)
    lora_plus_ratio: float | None = None  # LoRA+: lr of B = ratio * lr of A (e.g. 16); None = plain LoRA
    mask: str = "random"  # SHiRA mask: random | magnitude | gradient | snip
    fraction: float | None = None  # SHiRA: share of each matrix that trains (overrides the r-based count)
    miss_variant: str = "default"  # MiSS: default | bat
    quantize: str | None = None  # frozen base: None | "nf4" | "int8"
    # --- projected optimizers (GaLore, GradNormLoRP) -----------------------------------------------------------
    gap: int = 200  # steps between projector refreshes
    proj_scale: float = 0.25  # GaLore alpha
    svd: str = "randomized"  # "full" | "randomized" projector refresh
    block_size: int = 256  # block size of 8/4-bit optimizer states
    compile_optim: bool = False  # fuse the 8/4-bit Adam(W) step into one torch.compile kernel (~20 s to compile)
    # --- DLRT -----------------------------------------------------------------------------------------------
    tau: float = 0.1  # truncation tolerance relative to the singular values of S
    # --- language modelling (task=causal-lm) --------------------------------------------------------------------
    init_weights: str = "pretrained"  # "pretrained" | "scratch"
    arch: str | None = None  # "llama" for from-scratch pre-training
    preset: str | None = None  # model size preset for --init scratch
    activation_checkpointing: bool = False
    # --- output -----------------------------------------------------------------------------------------------
    out: str = "runs/latest"
    save_every: int = 0  # write a checkpoint every N steps (0 = only at the end)
    eval_every: int = 0  # validate every N steps (0 = only at the end)
    resume: bool = False  # continue from the newest checkpoint in `out`
    stop_at: int | None = None  # end this invocation after this step (the schedule still plans for `steps`)
    overwrite: bool = False  # replace an existing run folder instead of refusing
    progress: bool = True  # show a progress bar
    extra: dict[str, Any] = field(default_factory=dict)  # free-form options for third-party methods

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = "bible" if self.task == "causal-lm" else "vader"
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # JSON round trip turns tuples into lists
        checks = [
            (self.lr is None or self.lr > 0, "lr", self.lr, "must be > 0"),
            (self.head_lr is None or self.head_lr > 0, "head_lr", self.head_lr, "must be > 0"),
            (self.stop_at is None or self.stop_at > 0, "stop_at", self.stop_at, "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0"),
            (self.epochs is None or self.epochs > 0, "epochs", self.epochs, "must be > 0"),
            (self.steps is None or self.steps > 0, "steps", self.steps, "must be > 0"),
            (self.batch_size > 0, "batch_size", self.batch_size, "must be > 0"),
            (self.grad_accum > 0, "grad_accum", self.grad_accum, "must be > 0"),
            (self.max_length > 1, "max_length", self.max_length, "must be > 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0"),
            (self.nan_policy in ("stop", "skip"), "nan_policy", self.nan_policy, "must be 'stop' or 'skip'"),
            (not self.compile_optim or self.optim in compilable_optimizers(), "compile_optim", self.compile_optim,
             f"applies only to --optim {'/'.join(compilable_optimizers())}, not {self.optim!r}"),
            (self.rank > 0, "rank", self.rank, "must be > 0"),
            (self.save_every >= 0, "save_every", self.save_every, "must be >= 0"),
            (self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0"),
            (self.train_size is None or self.train_size > 0, "train_size", self.train_size, "must be > 0"),
            (self.val_size is None or self.val_size > 0, "val_size", self.val_size, "must be > 0"),
            (self.tau > 0, "tau", self.tau, "must be > 0"),
            (self.gap > 0, "gap", self.gap, "must be > 0"),
            (self.fraction is None or 0 < self.fraction <= 1, "fraction", self.fraction, "must be in (0, 1]"),
            (self.task in ("classify", "causal-lm"), "task", self.task, "must be 'classify' or 'causal-lm'"),
            (self.quantize in (None, "nf4", "int8"), "quantize", self.quantize, "must be nf4 or int8"),
            (self.quantize is None or self.method not in ("full", "galore", "gradnormlorp", "dlrt"), "quantize",
             self.quantize, f"needs a frozen base; method {self.method!r} trains the base weights"),
            (self.init != "loftq" or (self.quantize is not None and self.method in ("lora", "rslora")), "init",
             self.init, "works with --quantize nf4|int8 and --method lora or rslora"),
            (self.strategy in ("auto", "ddp", "fsdp"), "strategy", self.strategy, "must be auto, ddp or fsdp"),
            (self.model_dropout is None or 0 <= self.model_dropout < 1, "model_dropout", self.model_dropout,
             "must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)"),
            (self.alpha > 0, "alpha", self.alpha, "must be > 0"),
            (self.block_size > 0, "block_size", self.block_size, "must be > 0"),
            (self.proj_scale > 0, "proj_scale", self.proj_scale, "must be > 0"),
            (self.svd in ("full", "randomized"), "svd", self.svd, "must be 'full' or 'randomized'"),
            (self.lora_plus_ratio is None or self.lora_plus_ratio > 0, "lora_plus_ratio", self.lora_plus_ratio,
             "must be > 0"),
            (self.miss_variant in ("default", "bat", "mini"), "miss_variant", self.miss_variant,
             "must be default, bat or mini"),
            (self.init_weights in ("pretrained", "scratch"), "init_weights", self.init_weights,
             "must be 'pretrained' or 'scratch'"),
        ]
        checks += [
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
             "must be two numbers in [0, 1)"),
            (self.device in ("auto", "cpu") or self.device.split(":")[0] in ("cuda", "mps"), "device", self.device,
             "must be 'auto', 'cpu' or 'cuda[:N]'"),
        ]
        for ok, name, value, why in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={value!r} {why}")
        if self.targets.startswith("re:"):
            try:
                re.compile(self.targets[3:])
            except re.error as exc:
                raise ValueError(f"TrainConfig.targets={self.targets!r} is not a valid regex ({exc})") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not _matches(value, hints[key]):
                raise ValueError(f"TrainConfig.{key}={value!r} has type {type(value).__name__}, expected {hints[key]}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _matches(value: Any, hint: Any) -> bool:
    """Loose JSON-level type check (ints are accepted for floats, lists for tuples)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if args and type(None) in args:
        return value is None or any(_matches(value, a) for a in args if a is not type(None))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)
