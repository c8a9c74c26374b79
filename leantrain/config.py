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


# Methods that train the base weights themselves; every other method freezes them (adapters, head-only), which is
# why they refuse --quantize (nothing frozen to quantize) and random --init-weights scratch bases.

def method_spec(name: str) -> Any:
    """The registered method object (its own spec: trains_base, tasks, validate); imported on first use."""
    from .methods import get_method

    return get_method(name)

# Newcomer defaults of --init-weights scratch: docs/lm.md's measured LLaMA-tiny recipe (full AdamW, lr 3e-3).
SCRATCH_METHOD, PRETRAINED_METHOD = "full", "lora"
SCRATCH_LR = 3e-3
# --train-size/--val-size default: a subset of the bundled demo data sets only; a user's file is used whole.
DEMO_SIZE, DEMO_SIZES, DEMO_DATA = "auto", (4000, 1000), ("vader", "bible")
REPORT_TO = ("jsonl", "tensorboard", "none")


def default_lr(task: str, method: str, optim: str, scratch: bool) -> float:
    """The lr a run without --lr uses: the method's (or pre-training's) AdamW lr times the optimizer's
    ``lr_scale`` for the task (leantrain/optim/spec.py)."""
    from .optim.registry import get_spec

    base = SCRATCH_LR if scratch else method_spec(method).default_lr
    return float(f"{base * get_spec(optim).lr_scale_for(task):.6g}")  # 3e-3 x 10/3 reads 0.01 in config.json


def _plain_moments(optim: str) -> bool:
    """Whether --optim keeps uncompressed moments that --state-dtype may store in bf16 (its spec says)."""
    from .optim.registry import specs

    spec = specs().get(optim)
    return spec is not None and spec.codec in ("native", "fp32")


def _is_size(text: str) -> bool:
    from .units import parse_size

    try:
        return parse_size(text) > 0
    except ValueError:
        return False


def option(default: Any = None, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field whose ``help`` metadata is the CLI help of its ``leantrain train`` option."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    # --- what to train on -------------------------------------------------------------------------------------
    task: str = option("classify", "'classify' (sentence classification) or 'causal-lm'")
    model: str = option("minilm", "'minilm' (embedded MiniLM-L6), 'tiny' (random 2-layer BERT, for tests), "
                                  "'smollm2' (causal-lm) or a local Hugging Face model folder; with "
                                  "--init-weights scratch only the tokenizer")
    data: str | None = option(None, "'vader' | 'bible' | a .csv/.jsonl file (.txt too for causal-lm); "
                                    "None = vader (classify) / bible (causal-lm)")
    val_data: str | None = option(None, "optional separate validation file; else a deterministic split of --data")
    text_column: str = option("text", "column of a .csv/.jsonl --data/--val-data file that holds the text")
    label_column: str = option("label", "column of a .csv/.jsonl --data/--val-data file that holds the label "
                                        "(classify)")
    train_size: int | str | None = option(DEMO_SIZE, "training examples used: sentences (stratified) or LM "
                                                     f"blocks; {DEMO_SIZE} = {DEMO_SIZES[0]} on the bundled "
                                                     "demo data (vader/bible), every row of a user's file; "
                                                     "None = all of it")
    val_size: int | str | None = option(DEMO_SIZE, "validation examples used: sentences or LM blocks; "
                                                   f"{DEMO_SIZE} = {DEMO_SIZES[1]} on the bundled demo data, "
                                                   "all of a user's file; None = all of it")
    max_length: int = option(64, "tokens per example: sentences are cut to it (classify); length of each packed "
                                 "block (causal-lm)")
    model_dropout: float | None = option(None, "override the model's own dropout (0 makes runs batch-split "
                                               "invariant)")
    # --- how to train -----------------------------------------------------------------------------------------
    method: str | None = option(None, f"what trains; None = {SCRATCH_METHOD} for --init-weights scratch, else "
                                      f"{PRETRAINED_METHOD} (adapters or head on random scratch weights train "
                                      "almost nothing: refused unless --lr is given too)")
    optim: str = option("adamw", "how the trained parameters are updated")
    lr: float | None = option(None, f"learning rate; None = {SCRATCH_LR:g} for --init-weights scratch "
                                    "(docs/lm.md's pre-training recipe), else the method's default, times the "
                                    "optimizer's lr scale (--optim's list); config.json records the value")
    head_lr: float | None = option(None, "lr of the fresh task head; None = max(lr, 1e-3)")
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW-style)")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam moment decay rates")
    epochs: float | None = option(None, "train for this many passes over the data ...")
    steps: int | None = option(None, "... or exactly this many optimizer steps (wins over --epochs); "
                                     "neither = 1 epoch")
    batch_size: int = option(16, "examples (sentences or LM blocks) per micro-batch, summed over all "
                                 "processes under torchrun")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    warmup_ratio: float = option(0.06, "share of the steps with linear warm-up, then linear decay to 0")
    grad_clip: float | None = option(1.0, "max global gradient norm; None disables clipping")
    nan_policy: str = option("stop", "'stop' | 'skip': what to do when the loss or a gradient is not finite")
    seed: int = option(0, "seeds head init, adapter init, dropout and batch order (not the data split)")
    device: str = option("auto", "'auto' (cuda when present, else cpu), 'cpu' or 'cuda[:N]'")
    strategy: str = option("auto", "under torchrun: 'ddp' or 'fsdp' (FSDP2 fully_shard); 'auto' = ddp")
    # --- adapters (LoRA family, VeRA, MiSS, SHiRA) -------------------------------------------------------------
    rank: int = option(8, "rank r: adapter rank (LoRA family, VeRA), block size (MiSS), entries r*(out+in) per "
                          "matrix (SHiRA), projection rank (GaLore optimizers, GradNormLoRP), factor rank "
                          "(lowrank), minimum rank per layer (DLRT)")
    alpha: float = option(16.0, "LoRA scaling numerator: scale = alpha / r (alpha / sqrt(r) for rslora)")
    dropout: float = option(0.0, "dropout on the adapter input")
    targets: str = option("all-linear", "adapted layers: 'all-linear' (every Linear but the head), "
                                        "comma-separated module names, or a regex with prefix 're:'")
    init: str = option("default", "LoRA init: default | gaussian | pissa | pissa_fast | loftq (needs --quantize) | "
                                  "lora-ga | corda-kpm | corda-ipm (from the first training batches)")
    lora_plus_ratio: float | None = option(None, "LoRA+: lr of B = ratio * lr of A (e.g. 16); None = plain LoRA")
    mask: str = option("random", "SHiRA mask: random | magnitude | gradient | snip")
    fraction: float | None = option(None, "SHiRA: share of each matrix that trains (overrides the r-based count)")
    miss_variant: str = option("default", "MiSS: default | bat | mini")
    quantize: str | None = option(None, "store the frozen base weights as 'nf4' or 'int8' (adapter methods "
                                        "only); None = unquantized")
    # --- optimizers: projected (GaLore, GradNormLoRP) and 8/4-bit states ---------------------------------------
    gap: int = option(200, "steps between projector refreshes (GaLore optimizers, GradNormLoRP)")
    proj_scale: float = option(0.25, "scale alpha of the projected update (GaLore optimizers, GradNormLoRP)")
    svd: str = option("randomized", "projector refresh: 'full' SVD or 'randomized' range finder")
    block_size: int = option(256, "elements per quantization block (one absmax each) of 8/4-bit optimizer "
                                  "states; not a sequence length")
    compile_optim: bool = option(False, "fuse the 8/4-bit Adam(W) step into one torch.compile kernel "
                                        "(~20 s to compile)")
    # --- DLRT -----------------------------------------------------------------------------------------------
    tau: float = option(0.1, "DLRT truncation tolerance relative to the singular values of S")
    # --- language modelling (task=causal-lm) --------------------------------------------------------------------
    init_weights: str = option("pretrained", "'pretrained' (load --model) or 'scratch' (random --arch/--preset "
                                             "model; causal-lm only; changes the --method and --lr defaults)")
    arch: str | None = option(None, "architecture for --init-weights scratch: 'llama' (None = llama)")
    preset: str | None = option(None, "model size for --init-weights scratch: nano | tiny | small | 60m | 130m | "
                                      "350m | 1b | 7b, also spelled llama-7b etc. (None = tiny)")
    # --- precision and memory (docs/bigmodel.md) -----------------------------------------------------------------
    # `leantrain memory` spells --dtype and --layerwise with its own (shorter) help, which must contain these
    # (tests/test_cli_vocabulary.py); the full semantics are in docs/bigmodel.md.
    dtype: str = option("fp32", "weights, activations and gradients: fp32 | bf16 (pure bf16, no fp32 master copy; "
                                "optimizer moments keep their own codec) | fp16 (only with --master-weights fp32: "
                                "mixed precision with a loss scaler)")
    bf16_update: str = option("stochastic", "how --dtype bf16 stores an update: 'stochastic' rounding (seeded), "
                                            "'kahan' (bf16 compensation buffer per parameter) or 'plain' "
                                            "(round to nearest: small updates are lost); not used with --master-weights")
    state_dtype: str = option("fp32", "plain optimizer moments (adamw, galore-adamw, muon): fp32 | bf16 (half the "
                                      "bytes); 8/4-bit optimizers keep their codes")
    master_weights: str | None = option(None, "'fp32': mixed precision: fp32 weights, gradients and optimizer, "
                                              "forward/backward under autocast to --dtype (fp16 adds a dynamic "
                                              "loss scaler); None = pure --dtype")
    memory_budget: str | None = option(None, "refuse the run before allocating if the estimated peak (docs/memory.md) "
                                             "exceeds SIZE (8GiB, 22G, 500MiB) or 'auto' (available RAM, or "
                                             "free GPU memory on CUDA); None = estimate and record only")
    layerwise: bool = option(False, "step each parameter inside backward and free its gradient, so one gradient "
                                    "is alive at a time (GaLore's 7B recipe; --grad-clip per parameter)")
    galore_in_backward: bool = option(False, "GaLore optimizers: between projector refreshes, compute each "
                                             "nn.Linear's low-rank weight gradient inside backward from its "
                                             "factors, never the full one (needs --grad-clip none; one process)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward (less "
                                                   "memory, ~1 extra forward; every task)")
    return_freed_memory: bool = option(False, "CPU: hand freed tensor memory back to the OS at once (glibc maps "
                                              "each block >= 128 KiB on its own): peak RSS follows the live tensors "
                                              "and the estimate (-17 % at LLaMA-130m bf16) but every step "
                                              "page-faults its temporaries in again (~1.3-1.6x s/step measured); "
                                              "docs/bigmodel.md")
    # --- output -----------------------------------------------------------------------------------------------
    out: str = option("runs/latest", "run folder (config.json, metrics, artifacts, checkpoints/)")
    save_every: int = option(0, "write a resumable checkpoint every N steps; 0 = none (the final trainable "
                                "weights are always saved; --stop-at still leaves a checkpoint)")
    eval_every: int = option(0, "validate every N steps (0 = only the final evaluation)")
    resume: bool = option(False, "continue from the newest checkpoint in --out")
    stop_at: int | None = option(None, "end this invocation after this step (the schedule still plans for "
                                       "--steps)")
    overwrite: bool = option(False, "replace an existing run folder instead of refusing")
    progress: bool = option(True, "show a progress bar")
    report_to: str = option("jsonl", "per-step metrics: 'jsonl' (RUN/metrics.jsonl), 'tensorboard' (event files "
                                     "in RUN/tensorboard/), both as 'jsonl,tensorboard', or 'none'")
    extra: dict[str, Any] = field(default_factory=dict,
                                  metadata={"help": "free-form options for third-party methods (config.json only)"})

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # JSON round trip turns tuples into lists
        self._check_init_weights()
        self._resolve_defaults()
        method = method_spec(self.method)  # unknown names: one line listing the registered methods
        compilable = compilable_optimizers() if self.compile_optim else ()
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
            (not self.compile_optim or self.optim in compilable, "compile_optim", self.compile_optim,
             f"applies only to --optim {'/'.join(compilable)}, not {self.optim!r}"),
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
            (self.quantize is None or not method.trains_base, "quantize",
             self.quantize, f"needs a frozen base; method {self.method!r} trains the base weights"),
            (self.init != "loftq" or self.quantize is not None, "init", self.init, "needs --quantize nf4|int8"),
            (self.task in method.tasks, "method", self.method,
             f"supports --task {'/'.join(method.tasks)}, not {self.task!r}"),
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
        self._check_precision_and_layerwise(method)
        method.validate(self)
        if self.targets.startswith("re:"):
            try:
                re.compile(self.targets[3:])
            except re.error as exc:
                raise ValueError(f"TrainConfig.targets={self.targets!r} is not a valid regex ({exc})") from None

    def _check_precision_and_layerwise(self, method: Any) -> None:
        """--dtype, --bf16-update and --layerwise: what they cannot do yet is refused in one line."""
        checks = [
            (self.dtype in ("fp32", "bf16", "fp16"), "dtype", self.dtype, "must be fp32, bf16 or fp16"),
            (self.dtype != "fp16" or self.master_weights == "fp32", "dtype", self.dtype,
             ("pure fp16 training underflows without fp32 master weights: add --master-weights fp32 (mixed "
              "precision with a loss scaler) or use --dtype bf16")),
            (self.master_weights in (None, "fp32"), "master_weights", self.master_weights, "must be fp32 or None"),
            (self.state_dtype in ("fp32", "bf16"), "state_dtype", self.state_dtype, "must be fp32 or bf16"),
            (self.state_dtype == "fp32" or _plain_moments(self.optim), "state_dtype", self.state_dtype,
             f"applies to plain moments; --optim {self.optim} keeps its own codes"),
            (self.master_weights is None or self.dtype != "fp32", "master_weights", self.master_weights,
             "needs a low --dtype to compute in (bf16 or fp16)"),
            (not (self.dtype == "fp16" and (self.layerwise or getattr(method, "changes_parameter_shapes", False))),
             "dtype", self.dtype, ("with its loss scaler cannot run --layerwise or a multi-pass method "
                                   f"(--method {self.method}); use --dtype bf16")),
            (self.bf16_update in ("stochastic", "kahan", "plain"), "bf16_update", self.bf16_update,
             "must be stochastic, kahan or plain"),
            (self.memory_budget in (None, "auto") or _is_size(self.memory_budget), "memory_budget",
             self.memory_budget, "must be a size like 8GiB, 22G, 500MiB, or 'auto'"),
            (self.dtype == "fp32" or self.strategy != "fsdp", "dtype", self.dtype,
             "runs on one process or under --strategy ddp, not fsdp (yet)"),
            (not self.layerwise or not getattr(method, "changes_parameter_shapes", False), "layerwise",
             self.layerwise, f"cannot drive --method {self.method}: it changes parameter shapes in a multi-pass step"),
        ]
        if self.galore_in_backward:
            from .optim.galore import IN_BACKWARD

            checks += [
                (self.optim in IN_BACKWARD, "galore_in_backward", True,
                 f"needs --optim {' | '.join(IN_BACKWARD)}, not {self.optim}"),
                (self.grad_clip is None, "galore_in_backward", True,
                 "needs --grad-clip none (the full gradient, whose norm a global clip needs, is never built)"),
                (self.master_weights is None, "galore_in_backward", True,
                 "cannot run under autocast (--master-weights fp32); use --dtype bf16"),
                (not (self.layerwise and self.grad_accum > 1), "galore_in_backward", True,
                 "with --layerwise steps at every backward: use --grad-accum 1"),
            ]
        for ok, name, value, why in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={value!r} {why}")

    def _check_init_weights(self) -> None:
        """Refuse what the newcomer defaults cannot mean: scratch weights exist for causal LMs only, and adapters
        (or a head) trained on a random base learn almost nothing unless the user chose that with --lr."""
        if self.init_weights not in ("pretrained", "scratch"):
            raise ValueError(f"TrainConfig.init_weights={self.init_weights!r} must be 'pretrained' or 'scratch'")
        if self.init_weights != "scratch":
            return
        if self.task != "causal-lm":
            raise ValueError(f"TrainConfig.init_weights='scratch' applies to --task causal-lm only, not {self.task!r}")
        if self.method is not None and self.lr is None and not method_spec(self.method).trains_base:
            raise ValueError(f"TrainConfig.method={self.method!r} on --init-weights scratch trains almost nothing "
                             f"(its base stays random): pass --method {SCRATCH_METHOD} (the scratch default) or "
                             "an explicit --lr to do it deliberately")

    def _resolve_defaults(self) -> None:
        """Fill the task-dependent defaults (None) so config.json records what the run really used."""
        scratch = self.init_weights == "scratch"
        if self.data is None:
            self.data = "bible" if self.task == "causal-lm" else "vader"
        if self.method is None:
            self.method = SCRATCH_METHOD if scratch else PRETRAINED_METHOD
        if self.lr is None:
            self.lr = default_lr(self.task, self.method, self.optim, scratch)
        self._resolve_data_options()

    def _resolve_data_options(self) -> None:
        """--train-size/--val-size "auto": the demo subset on bundled data, all rows of a user's file (None);
        --text-column/--label-column name columns of a classification file; --report-to lists trackers."""
        for name, default in (("text_column", "text"), ("label_column", "label")):
            value = getattr(self, name)
            if value != default and (self.task != "classify" or self.data in DEMO_DATA):
                where = f"--task {self.task}" if self.task != "classify" else f"the bundled data {self.data!r}"
                raise ValueError(f"TrainConfig.{name}={value!r} applies to .csv/.jsonl files of --task classify, "
                                 f"not {where}")
        for name, demo in zip(("train_size", "val_size"), DEMO_SIZES):
            value = getattr(self, name)
            if value == DEMO_SIZE:
                setattr(self, name, demo if self.data in DEMO_DATA else None)
            elif isinstance(value, (str, bool)):
                raise ValueError(f"TrainConfig.{name}={value!r} must be a number, None (all) or {DEMO_SIZE!r}")
        trackers = [t.strip() for t in self.report_to.split(",") if t.strip()]
        unknown = [t for t in trackers if t not in REPORT_TO]
        if unknown or not trackers or ("none" in trackers and len(trackers) > 1):
            raise ValueError(f"TrainConfig.report_to={self.report_to!r} must be 'none' or a comma-separated list of "
                             f"{', '.join(t for t in REPORT_TO if t != 'none')}")

    @property
    def is_mixed(self) -> bool:
        """--master-weights fp32 with a low --dtype: fp32 weights, autocast compute (leantrain/mixed.py)."""
        return self.master_weights == "fp32" and self.dtype != "fp32"

    @property
    def weight_dtype(self) -> str:
        """The dtype the weights are built and kept in: fp32 under mixed precision, else --dtype."""
        return "fp32" if self.is_mixed else self.dtype

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
