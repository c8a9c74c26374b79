"""Analytic training-memory estimator: model × method × optimizer × dtype × batch × sequence × checkpointing.

Memory = weights + gradients + optimizer states + activations (+ the optimizer step's own workspace, which never
coexists with activations). Every formula is a count of tensor bytes; sources per method:

* LoRA / rsLoRA / PiSSA: A (r×in) + B (out×r) per adapted Linear (Hu et al. 2021); DoRA adds m (out)
  (Liu et al. 2024); VeRA: shared frozen A (r×in_max), B (out_max×r) + λ_d (r), λ_b (out) per layer
  (Kopiczko et al. 2024); MiSS: r·out (PEFT ``MissConfig``); SHiRA: K = r(out+in) or fraction·out·in values +
  their indices (``shira_index_bytes``). See /work/shared/methods/*.md.
* GaLore (Zhao et al. 2024, Table 1): for an m×n weight (m ≤ n) states mr + 2nr (projector + two moments on the
  large side); other tensors keep dense states. GradNormLoRP: V (m×n) + g (out) replace W, V's moments are
  projected, g gets dense Adam.
* 8/4-bit states (Dettmers et al. 2022): 1 (or ½) byte per element + one fp32 absmax per block; tensors with
  fewer than 4096 elements keep fp32 states.
* DLRT (Schotthöfer et al. 2022), as leantrain's KLS integrator keeps it: W replaced by U (n×r), V (m×r) buffers and
  S (r×r); optimizer states for K (n×r), L (m×r), S persist across steps. Through a whole KLS step K, L, the
  augmented bases Û (n×2r), V̂ (m×2r), S̃ (2r×2r) with its gradient and its moments transported to 2r×2r live
  alongside the gradients (counted with them, ``details["gradients.dlrt_step"]``); the cached output gradients
  for the S-step count as activations. The rest of the model trains densely unless ``dlrt_freeze_other``. Ranks
  adapt during training: pass ``dlrt_ranks``.
* Quantized frozen base (QLoRA, Dettmers et al. 2023): NF4 = ½ byte + 8-bit absmax per 64 elements + fp32 scale per
  256 absmaxes (double quantization); int8 = 1 byte + one fp32 scale per output row.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .activations import activation_bytes
from .modelspec import ModelSpec, ParamSpec, model_spec

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
MIN_QUANT_STATE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 states

# Optimizers of the papers' memory tables that leantrain does not train with (torch.optim names): estimate only.
REFERENCE_OPTIMIZERS: dict[str, tuple[int, str, bool]] = {
    "adam": (2, "native", False), "lion": (1, "native", False), "sgd": (0, "native", False),
    "sgd-momentum": (1, "native", False),
}


def optimizer_table() -> dict[str, tuple[int, str, bool]]:
    """name -> (states per element, codec, projected): every registered ``--optim`` spec plus the reference
    optimizers. fp32 moments count as "native" (the parameter's dtype), as in the GaLore paper's tables."""
    from ..optim.registry import specs

    table = {name: (s.states, "native" if s.codec in ("native", "fp32") else s.codec, s.projected)
             for name, s in specs().items()}
    return {**table, **REFERENCE_OPTIMIZERS}


OPTIMIZERS = optimizer_table()
ADAPTERS = ("lora", "rslora", "pissa", "dora", "vera", "miss", "shira")
# ``--method`` names of leantrain.methods that the estimator models (``lowrank`` is not modelled).
ESTIMATED_METHODS = ("full", "head", *ADAPTERS, "gradnormlorp", "dlrt")
# The estimator's old spellings, from before GaLore became an optimizer: name -> the ``--optim`` it implies
# over ``--method full`` (``{optim}`` is the optimizer passed with it).
METHOD_ALIASES = {"galore": "galore-{optim}", "galore-8bit": "galore-adamw8bit"}
METHODS = (*ESTIMATED_METHODS, *METHOD_ALIASES)  # every name estimate() accepts
QUANTIZE = (None, "nf4", "int8")


def resolve_method_alias(method: str, optim: str) -> tuple[str, str]:
    """``leantrain train``'s (method, optimizer) for an old estimator spelling; other names pass unchanged.

    ``--method galore --optim adamw8bit`` keeps meaning ``--method full --optim galore-adamw8bit``, as it always
    did; a ``galore-*`` optimizer given with either alias wins."""
    if method not in METHOD_ALIASES:
        return method, optim
    return "full", optim if optim.startswith("galore-") else METHOD_ALIASES[method].format(optim=optim)


@dataclass
class MemoryReport:
    """Byte counts of one training configuration; ``total`` is the estimated peak."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    optimizer_workspace: int  # transient buffers of optimizer.step(); activations are already freed then
    params_total: int
    params_trainable: int
    setting: dict[str, Any] = field(default_factory=dict)
    details: dict[str, int] = field(default_factory=dict)
    backward_start_gradients: int = 0  # gradients already alive when backward starts (head, DLRT step tensors)

    @property
    def total(self) -> int:
        """Peak = resident + the larger of the backward start (all activations) and the optimizer step (all
        gradients + step workspace). In between, backward frees each block's activations as it creates that
        block's gradients, so the sum of the two ramps peaks at one of its ends."""
        backward = self.activations + self.backward_start_gradients
        step = self.gradients + self.optimizer_workspace
        return self.weights + self.optimizer_states + max(backward, step)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        return out

    def format_table(self) -> str:
        """Readable table (MiB below 1 GiB, else GiB)."""
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer states", self.optimizer_states), ("activations", self.activations),
                ("optimizer step workspace", self.optimizer_workspace), ("total (peak)", self.total)]
        head = ", ".join(f"{k}={v}" for k, v in self.setting.items() if v not in (None, False))
        width = max(len(r[0]) for r in rows)
        lines = [head, f"parameters: {self.params_total:,} total, {self.params_trainable:,} trainable"]
        lines += [f"{name:<{width}}  {human_bytes(b):>12}" for name, b in rows]
        lines.append("peak = weights + optimizer states + max(activations + head gradients, "
                     "gradients + step workspace)")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class _Trainable:
    name: str
    shape: tuple[int, ...]
    projected: bool = False  # GaLore-style low-rank moments

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def state_bytes(numel: int, states: int, codec: str, elt: int, block_size: int = 256) -> int:
    """Bytes of ``states`` optimizer states of a tensor with ``numel`` elements under a codec."""
    if states == 0:
        return 0
    if codec == "native":
        return states * numel * elt
    if numel < MIN_QUANT_STATE:
        return states * numel * 4
    per = numel if codec == "8bit" else (numel + 1) // 2
    return states * (per + 4 * math.ceil(numel / block_size))


def quantized_bytes(numel: int, rows: int, scheme: str) -> int:
    """Bytes of a frozen weight stored as NF4 (double-quantized absmax, QLoRA) or row-wise int8."""
    if scheme == "nf4":
        blocks = math.ceil(numel / 64)
        return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 16 * 4
    if scheme == "int8":
        return numel + 4 * rows
    raise ValueError(f"quantize={scheme!r} must be one of nf4, int8")


def shira_index_bytes(k: int, shape: tuple[int, ...], layout: str = "leantrain") -> int:
    """Index bytes of K sparse entries: PEFT keeps int32 (2, K); leantrain's CSR layer keeps K flat positions and
    the out+1 row pointers of S, int32 while the matrix has < 2**31 entries (the transposed layout is rebuilt in
    each backward, not kept)."""
    if layout == "peft":
        return 2 * k * 4
    if layout == "leantrain":
        out_f, in_f = shape
        width = 4 if out_f * in_f < 2**31 else 8
        return width * (k + out_f + 1)
    raise ValueError(f"shira_layout={layout!r} must be 'leantrain' or 'peft'")


def select_targets(spec: ModelSpec, targets: str) -> list[ParamSpec]:
    """Linear weights an adapter/DLRT/GradNormLoRP touches (same rules as leantrain.adapters.inject)."""
    lin = spec.linears()
    if targets == "all-linear":
        chosen = [p for p in lin if not p.is_head]
    elif targets.startswith("re:"):
        chosen = [p for p in lin if re.fullmatch(targets[3:], p.module) and not p.is_head]
    else:
        names = [t.strip() for t in targets.split(",") if t.strip()]
        chosen = [p for p in lin if any(p.module == n or p.module.endswith("." + n) for n in names)]
    if not chosen:
        raise ValueError(f"targets={targets!r} selects no Linear of {spec.name}")
    return chosen


def _adapter_tensors(method: str, p: ParamSpec, rank: int, fraction: float | None) -> list[tuple[str, tuple]]:
    out_f, in_f = p.shape
    m = p.module
    if method in ("lora", "rslora", "pissa", "dora"):
        ts = [(m + ".lora_A", (rank, in_f)), (m + ".lora_B", (out_f, rank))]
        return ts + ([(m + ".lora_magnitude", (out_f,))] if method == "dora" else [])
    if method == "vera":
        return [(m + ".vera_lambda_d", (rank,)), (m + ".vera_lambda_b", (out_f,))]
    if method == "miss":
        return [(m + ".miss_block", (rank, out_f))]
    if method == "shira":
        k = int(fraction * out_f * in_f) if fraction else rank * (out_f + in_f)
        if k > out_f * in_f:
            raise ValueError(f"shira: r={rank} gives {k} entries > {out_f}x{in_f} of {m}; lower the rank")
        return [(m + ".shira_weight", (k,))]
    raise AssertionError(method)


def _adapter_act_per_token(method: str, targets: list[ParamSpec], rank: int, elt: int) -> int:
    if method in ("lora", "rslora", "pissa", "miss"):
        return sum(elt * rank for _ in targets)
    if method == "dora":
        return sum(elt * (rank + 2 * p.shape[0]) for p in targets)
    if method == "vera":
        return sum(elt * (2 * rank + p.shape[0]) for p in targets)
    if method == "dlrt":  # x·V (r) in the K/L pass and the cached output gradient dY (out) for the S-step
        return sum(elt * (rank + p.shape[0]) for p in targets)
    return 0


def estimate(model: str | ModelSpec, method: str = "full", optim: str = "adamw", dtype: str = "fp32",
             batch_size: int = 1, seq_len: int = 512, activation_checkpointing: bool = False, rank: int = 8,
             quantize: str | None = None, targets: str = "all-linear", fraction: float | None = None,
             block_size: int = 256, attention: str = "eager", layerwise: bool = False, device: str = "cpu",
             shira_layout: str = "leantrain", num_labels: int = 2, dlrt_ranks: dict[str, int] | None = None,
             dlrt_freeze_other: bool = False) -> MemoryReport:
    """Estimate training memory in bytes; see the module docstring and docs/memory.md for every formula."""
    spec = model if isinstance(model, ModelSpec) else model_spec(model, num_labels)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for the memory estimator; choose one of: "
                         f"{', '.join(ESTIMATED_METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} must be one of nf4, int8 (or None)")
    if rank <= 0:
        raise ValueError(f"rank={rank} must be > 0")
    method, optim = resolve_method_alias(method, optim)
    if optim not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}; choose one of: {', '.join(OPTIMIZERS)}")
    n_states, codec, projected = OPTIMIZERS[optim]
    dense_methods = ("full", "gradnormlorp")
    if quantize and method in dense_methods:
        raise ValueError(f"quantize={quantize!r} needs a frozen base; method {method!r} trains every weight")
    elt = DTYPE_BYTES[dtype]

    # ---- what trains, what is stored -------------------------------------------------------------------------
    targets_l = select_targets(spec, targets) if method not in ("full", "head") else []
    target_ids = {p.name for p in targets_l}
    trainables: list[_Trainable] = []
    weights = sum(n * b for n, b in spec.buffers.values())
    details: dict[str, int] = {"weights.buffers": weights}
    extra_weights = 0
    base_bytes = 0
    for p in spec.params:
        if method == "dlrt" and p.name in target_ids:
            continue  # W is replaced by its factors
        trains = (method in dense_methods or p.is_head
                  or (method == "dlrt" and (not dlrt_freeze_other or p.module in {t.module for t in targets_l})))
        if method == "head" and spec.causal_lm and p.module == "lm_head":
            trains = True
        if method == "gradnormlorp" and p.name in target_ids:
            trainables.append(_Trainable(p.name + ".V", p.shape, projected=min(p.shape) > rank))
            trainables.append(_Trainable(p.name + ".g", (p.shape[0],)))
            base_bytes += (p.numel + p.shape[0]) * elt
            continue
        if trains:
            proj = projected and p.kind == "linear" and not p.is_head and min(p.shape) > rank
            trainables.append(_Trainable(p.name, p.shape, projected=proj))
        if quantize and p.name in target_ids and not trains:
            base_bytes += quantized_bytes(p.numel, p.shape[0], quantize)
        else:
            base_bytes += p.numel * elt
    details["weights.base"] = base_bytes
    if method in ADAPTERS:
        for p in targets_l:
            for name, shape in _adapter_tensors(method, p, rank, fraction):
                trainables.append(_Trainable(name, shape))
                extra_weights += math.prod(shape) * elt
                if method == "shira":
                    extra_weights += shira_index_bytes(math.prod(shape), p.shape, shira_layout)
        if method == "vera":
            in_max = max(p.shape[1] for p in targets_l)
            out_max = max(p.shape[0] for p in targets_l)
            details["weights.vera_shared"] = (rank * in_max + out_max * rank) * elt
            extra_weights += details["weights.vera_shared"]
    dlrt_step = 0  # tensors alive through a KLS step: K, L values, bases Û, V̂, S̃ (2r×2r) + its grad + moved moments
    if method == "dlrt":
        for p in targets_l:
            n, m = p.shape
            r = (dlrt_ranks or {}).get(p.module, rank)
            extra_weights += (n * r + m * r) * elt  # U, V buffers (S is a trainable below)
            for name, shape in ((".S", (r, r)), (".K", (n, r)), (".L", (m, r))):
                trainables.append(_Trainable(p.module + name, shape))
            extra_weights += r * r * elt
            dlrt_step += (n * r + m * r + 2 * r * (n + m) + 4 * r * r * (1 + 1 + n_states)) * elt
    details["weights.adapters"] = extra_weights
    weights += base_bytes + extra_weights

    # ---- gradients, optimizer states -------------------------------------------------------------------------
    grad_sizes = [t.numel * elt for t in trainables]
    gradients = (max(grad_sizes, default=0) if layerwise else sum(grad_sizes)) + dlrt_step
    details["gradients.dlrt_step"] = dlrt_step
    states = 0
    proj_bytes = 0
    for t in trainables:
        if t.projected:
            m, n = t.shape
            states += state_bytes(max(m, n) * rank, n_states, codec, elt, block_size)
            proj_bytes += min(m, n) * rank * elt
        else:
            states += state_bytes(t.numel, n_states, codec, elt, block_size)
        states += 4 if n_states else 0  # the step counter
    details["optimizer_states.projectors"] = proj_bytes
    states += proj_bytes

    # ---- activations and optimizer workspace -------------------------------------------------------------------
    act = activation_bytes(spec, batch_size, seq_len, elt, activation_checkpointing, attention,
                           trainable_encoder=method != "head",
                           adapter_bytes_per_token=_adapter_act_per_token(method, targets_l, rank, elt),
                           mask_bytes=1 if device == "cuda" else elt)
    details.update({"activations.blocks": act.blocks, "activations.outside": act.outside,
                    "activations.adapters": act.adapters})
    torch_adamw = optim in ("adamw", "adam") and method != "gradnormlorp"
    workspace = _workspace(trainables, n_states, elt, rank, device, torch_adamw)
    setting = {"model": spec.name, "method": method, "optim": optim, "dtype": dtype, "batch_size": batch_size,
                   "seq_len": seq_len, "activation_checkpointing": activation_checkpointing, "rank": rank,
                   "quantize": quantize, "device": device}
    n_train = sum(t.numel for t in trainables)
    kept = spec.num_params - (sum(p.numel for p in targets_l) if method == "dlrt" else 0)
    added = sum(t.numel for t in trainables if t.name.rsplit(".", 1)[-1] not in ("weight", "bias", "V", "K", "L"))
    n_total = kept + added  # parameters of the trained model (frozen bases/buffers of adapters not included)
    head_grads = sum(t.numel for t in trainables if any(p.name == t.name and p.is_head for p in spec.params)) * elt
    return MemoryReport(weights, gradients, states, act.total, workspace, n_total, n_train, setting, details,
                        backward_start_gradients=head_grads + dlrt_step)


def _workspace(trainables: list[_Trainable], n_states: int, elt: int, rank: int, device: str,
               torch_adamw: bool) -> int:
    """Transient bytes of one optimizer.step() (activations are already freed when it runs).

    * ``torch.optim.AdamW`` (plain ``adamw``/``adam``): on CPU it runs tensor by tensor and
      ``exp_avg_sq.sqrt() / bias_correction`` holds two temporaries the size of the largest tensor; on CUDA the
      foreach path takes the sqrt of every state at once (one extra copy of all states of one kind).
    * leantrain's block optimizers (8/4-bit codecs, projected groups): a chunked loop over 2^18 elements decodes
      the moments to fp32 and builds the update (~5 fp32 chunks); a non-fp32 parameter is copied to fp32 first.
      Projected tensors add the low-rank gradient and the full-size update ``back(N)``; projector refreshes add an
      fp32 copy of the gradient and a randomized range finder of width 2r on both sides.
    """
    if not trainables or n_states == 0:
        return 0
    numels = [t.numel for t in trainables]
    if torch_adamw:
        return sum(numels) * elt if device == "cuda" else 2 * max(numels) * elt
    chunk = 1 << 18
    lowrank = [max(t.shape) * rank if t.projected else t.numel for t in trainables]
    ws = 5 * 4 * min(chunk, max(lowrank))
    if elt != 4:
        ws += 4 * max(lowrank)
    proj = [t for t in trainables if t.projected]
    if proj:
        refresh = max(4 * (t.numel + 2 * rank * (t.shape[0] + t.shape[1])) for t in proj)
        ws += max(refresh, max(t.numel * elt + max(t.shape) * rank * 4 for t in proj))
    return ws


def estimate_config(cfg: Any, num_labels: int = 2, **overrides: Any) -> MemoryReport:
    """Estimate for a ``TrainConfig`` (one micro-batch of ``batch_size × max_length``); keywords override."""
    model = cfg.preset if (cfg.preset and cfg.init_weights == "scratch") else cfg.model
    kwargs: dict[str, Any] = {"method": cfg.method, "optim": cfg.optim, "batch_size": cfg.batch_size,
                                  "seq_len": cfg.max_length, "activation_checkpointing": cfg.activation_checkpointing,
                                  "rank": cfg.rank, "quantize": cfg.quantize, "targets": cfg.targets, "fraction": cfg.fraction,
                                  "block_size": cfg.block_size, "num_labels": num_labels,
                                  "dlrt_freeze_other": bool(cfg.extra.get("dlrt_freeze_other", False))}
    kwargs.update(overrides)
    return estimate(model, **kwargs)
