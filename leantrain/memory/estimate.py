"""Analytic training-memory estimator: model × method × optimizer × dtype × batch × sequence × checkpointing.

Memory = weights + gradients + optimizer states + activations (+ the optimizer step's own workspace, which never
coexists with activations). Every formula is a count of tensor bytes. What a method adds per adapted Linear is
declared by the method's own file (``estimator_tensors``, ``estimator_extras``, ``activation_bytes_per_token``,
see leantrain/methods.py); this file applies the generic rules. Sources per method:

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
* Gradients: every trainable tensor's; ``--layerwise`` (optimizer step inside backward) keeps the largest one,
  plus, with ``--grad-accum``, the accumulators between micro-batches (full gradients; r × max(m, n) for
  the matrices a GaLore optimizer projects, in the gradient's dtype). Under DDP the buckets keep every gradient.
* Quantized frozen base (QLoRA, Dettmers et al. 2023): NF4 = ½ byte + 8-bit absmax per 64 elements + fp32 scale per
  256 absmaxes (double quantization); int8 = 1 byte + one fp32 scale per output row.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..optim.spec import MIN_QUANT_NUMEL, STEP_BYTES, StateBytes, StateOptions, StateTensor, codec_bytes
from .activations import activation_bytes
from .modelspec import ModelSpec, ParamSpec, model_spec

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
MIN_QUANT_STATE = MIN_QUANT_NUMEL  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 states

# Optimizers of the papers' memory tables that leantrain does not train with (torch.optim names): estimate only.
REFERENCE_OPTIMIZERS: dict[str, tuple[int, str, bool]] = {
    "adam": (2, "native", False), "lion": (1, "native", False), "sgd": (0, "native", False),
    "sgd-momentum": (1, "native", False),
}


def optimizer_table() -> dict[str, tuple[int, str, bool]]:
    """name -> (states per element, codec, projected): every registered ``--optim`` spec plus the reference
    optimizers. Plain moments are "native"; ``estimate(moments=...)`` decides their width: fp32 (what leantrain's
    optimizers keep, for bf16 parameters too) or the parameter's dtype (the GaLore paper's tables)."""
    from ..optim.registry import specs

    table = {name: (s.states, "native" if s.codec in ("native", "fp32") else s.codec, s.projected)
             for name, s in specs().items()}
    return {**table, **REFERENCE_OPTIMIZERS}


OPTIMIZERS = optimizer_table()


def state_rule(optim: str) -> StateBytes | None:
    """The optimizer's own per-tensor state count (``OptimizerSpec.state_bytes``), None for the generic rule."""
    from ..optim.registry import specs

    spec = specs().get(optim)
    return spec.state_bytes if spec is not None else None


def _registered_methods() -> tuple[str, ...]:
    from ..methods import available_methods

    return tuple(available_methods())


# Every ``--method`` of leantrain.methods: each declares its own estimator terms (leantrain/methods.py).
ESTIMATED_METHODS = _registered_methods()
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
    step_in_backward: bool = False  # --layerwise: each optimizer step (and its workspace) runs inside backward

    @property
    def total(self) -> int:
        """Peak = resident + the larger of the backward start (all activations) and the optimizer step (all
        gradients + step workspace). In between, backward frees each block's activations as it creates that
        block's gradients, so the sum of the two ramps peaks at one of its ends. Under ``--layerwise`` the first
        hooks step the head while nearly all activations are alive, so the step workspace joins the backward
        start (measured at llama-350m bf16: without it the estimate was 0.90 of the tensor peak)."""
        backward = self.activations + self.backward_start_gradients
        if self.step_in_backward:
            backward += self.optimizer_workspace
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
        inside = " + step workspace (--layerwise)" if self.step_in_backward else ""
        lines.append(f"peak = weights + optimizer states + max(activations + head gradients{inside}, "
                     "gradients + step workspace)")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class _Trainable:
    name: str
    shape: tuple[int, ...]
    projected: bool = False  # GaLore-style low-rank moments
    matrix: bool = False  # in a group an optimizer's matrix rule takes (Muon, APOLLO): not head/embedding/norm

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def state_bytes(numel: int, states: int, codec: str, elt: int, block_size: int = 256) -> int:
    """Bytes of ``states`` optimizer states of a tensor with ``numel`` elements under a codec."""
    return states * codec_bytes(codec, numel, block_size, elt) if states else 0


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


@dataclass(frozen=True)
class EstimatorOptions:
    """What a method's estimator hooks may read (see ``leantrain.methods.MethodBase``)."""

    rank: int
    elt: int
    n_states: int
    fraction: float | None = None
    shira_layout: str = "leantrain"
    dlrt_ranks: dict[str, int] | None = None
    dlrt_freeze_other: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # TrainConfig.extra: a method's own options


@dataclass
class _Ledger:
    """Trainable tensors and byte counts of one configuration, filled rule by rule."""

    trainables: list[_Trainable] = field(default_factory=list)
    details: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, nbytes: int) -> None:
        self.details[key] = self.details.get(key, 0) + nbytes


def _method(name: str) -> Any:
    from ..methods import get_method

    return get_method(name)


def _base_weights(ledger: _Ledger, spec: ModelSpec, method: Any, targets: list[ParamSpec], opts: EstimatorOptions,
                  quantize: str | None, projected: bool) -> None:
    """The model's own parameters: which train (head always; the rest when the method trains the base), which
    stay frozen (quantized when targeted under --quantize), which the method replaces."""
    target_ids = {p.name for p in targets}
    target_modules = {p.module for p in targets}
    other = method.trains_base and method.trains_other(opts)
    ledger.add("weights.base", 0)
    for p in spec.params:
        if method.replaces_targets and p.name in target_ids:
            continue  # counted with the method's tensors
        trains = p.is_head or other or (method.trains_base and p.module in target_modules)
        if trains:
            proj = projected and p.kind == "linear" and not p.is_head and min(p.shape) > opts.rank
            ledger.trainables.append(_Trainable(p.name, p.shape, projected=proj,
                                                matrix=p.kind == "linear" and not p.is_head))
        frozen_quantized = quantize and p.name in target_ids and not trains
        ledger.add("weights.base", quantized_bytes(p.numel, p.shape[0], quantize) if frozen_quantized
                   else p.numel * opts.elt)


def _method_weights(ledger: _Ledger, method: Any, targets: list[ParamSpec], opts: EstimatorOptions) -> int:
    """The method's tensors per targeted Linear plus its extras; returns the trainable numel it adds to the
    model's parameter count (stored trainable tensors replace or join the base)."""
    ledger.add("weights.adapters", 0)
    added = 0
    for p in targets:
        out_f, in_f = p.shape
        for t in method.estimator_tensors(p.module, out_f, in_f, opts):
            numel = math.prod(t.shape)
            if t.trains:
                proj = t.projectable and min(t.shape) > opts.rank
                ledger.trainables.append(_Trainable(t.name, t.shape, projected=proj, matrix=len(t.shape) == 2))
            if t.stored and (t.trains or t.base):  # a frozen base tensor is still one of the model's weights
                added += numel
            if t.stored:
                ledger.add("weights.base" if t.base else "weights.adapters", numel * opts.elt)
    extras = method.estimator_extras([(p.module, *p.shape) for p in targets], opts) if targets else {}
    for key, nbytes in extras.items():
        if key.startswith("weights."):
            ledger.add("weights.adapters", nbytes)
        if key != "weights.adapters":
            ledger.add(key, nbytes)
    return added


def _states(ledger: _Ledger, n_states: int, codec: str, elt: int, rank: int, block_size: int,
            basis_elt: int, rule: StateBytes | None = None, head_dim: int | None = None) -> int:
    """Optimizer states (+ a step counter per tensor) and projector bases (in the gradient's dtype, ``basis_elt``)
    of every trainable tensor; ``elt`` is the width of plain ("native") moments. An optimizer that declares its
    own ``rule`` (OptimizerSpec.state_bytes) counts each tensor itself."""
    states = proj_bytes = 0
    opts = StateOptions(rank, block_size, elt, basis_elt, head_dim)
    for t in ledger.trainables:
        if rule is not None:
            s, b = rule(StateTensor(t.name, t.shape, t.matrix), opts)
            states, proj_bytes = states + s, proj_bytes + b
            continue
        if t.projected:
            m, n = t.shape
            states += state_bytes(max(m, n) * rank, n_states, codec, elt, block_size)
            proj_bytes += min(m, n) * rank * basis_elt
        else:
            states += state_bytes(t.numel, n_states, codec, elt, block_size)
        states += STEP_BYTES if n_states else 0
    ledger.details["optimizer_states.projectors"] = proj_bytes
    return states + proj_bytes


def _check_inputs(method: str, dtype: str, quantize: str | None, rank: int, optim: str) -> tuple[str, str]:
    if method not in METHODS and method not in ESTIMATED_METHODS:
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
    if quantize and _method(method).trains_base:
        raise ValueError(f"quantize={quantize!r} needs a frozen base; method {method!r} trains every weight")
    return method, optim


def estimate(model: str | ModelSpec, method: str = "full", optim: str = "adamw", dtype: str = "fp32",
             batch_size: int = 1, seq_len: int = 512, activation_checkpointing: bool = False, rank: int = 8,
             quantize: str | None = None, targets: str = "all-linear", fraction: float | None = None,
             block_size: int = 256, attention: str = "eager", layerwise: bool = False, device: str = "cpu",
             shira_layout: str = "leantrain", num_labels: int = 2, dlrt_ranks: dict[str, int] | None = None,
             dlrt_freeze_other: bool = False, moments: str = "fp32", bf16_update: str = "stochastic",
             state_dtype: str = "fp32", grad_accum: int = 1, ddp: bool = False,
             extra: dict[str, Any] | None = None) -> MemoryReport:
    """Estimate training memory in bytes; see the module docstring and docs/memory.md for every formula. What a
    method adds is declared by the method itself (``estimator_tensors`` / ``estimator_extras`` /
    ``activation_bytes_per_token`` in leantrain/methods.py), so this function names no method."""
    spec = model if isinstance(model, ModelSpec) else model_spec(model, num_labels)
    method, optim = _check_inputs(method, dtype, quantize, rank, optim)
    m = _method(method)
    task = "causal-lm" if spec.causal_lm else "classify"
    if task not in m.tasks:
        raise ValueError(f"--method {method} supports --task {'/'.join(m.tasks)}; {spec.name} is a {task} model")
    n_states, codec, projected = OPTIMIZERS[optim]
    elt = DTYPE_BYTES[dtype]
    if moments not in ("fp32", "param"):
        raise ValueError(f"moments={moments!r}: 'fp32' (leantrain's optimizers) or 'param' (the paper's tables)")
    # plain moments: leantrain keeps them in --state-dtype (fp32 by default, bf16 weights too); the paper's
    # tables and torch's reference optimizers keep them in the parameter's dtype
    state_elt = DTYPE_BYTES[state_dtype] if moments == "fp32" and optim not in REFERENCE_OPTIMIZERS else elt
    # The trainer's bf16 compensation steps fp32 copies of each weight and gradient, so projector bases come out
    # fp32, and Kahan keeps a bf16 buffer per trained weight (leantrain/precision.py); the paper counts neither.
    compensated = moments == "fp32" and dtype in ("bf16", "bfloat16") and bf16_update != "plain"
    basis_elt = 4 if compensated else elt
    opts = EstimatorOptions(rank, elt, n_states, fraction, shira_layout, dlrt_ranks, dlrt_freeze_other,
                            dict(extra or {}))
    targets_l = select_targets(spec, targets) if m.uses_targets else []
    ledger = _Ledger(details={"weights.buffers": sum(n * b for n, b in spec.buffers.values())})
    _base_weights(ledger, spec, m, targets_l, opts, quantize, projected)
    added = _method_weights(ledger, m, targets_l, opts)
    d = ledger.details
    weights = d["weights.buffers"] + d["weights.base"] + d["weights.adapters"]
    step_extra = sum(v for k, v in d.items() if k.startswith("gradients."))
    gradients = _gradient_bytes(ledger.trainables, elt, rank, layerwise and not ddp, grad_accum,
                                _accumulates_low_rank(optim)) + step_extra
    head_dim = spec.hidden // spec.heads if spec.heads else None
    states = _states(ledger, n_states, codec, state_elt, rank, block_size, basis_elt, state_rule(optim), head_dim)
    if compensated and bf16_update == "kahan":
        states += 2 * sum(t.numel for t in ledger.trainables)
    per_token = sum(m.activation_bytes_per_token(p.shape[0], p.shape[1], rank, elt) for p in targets_l)
    act = activation_bytes(spec, batch_size, seq_len, elt, activation_checkpointing, attention,
                           trainable_encoder=m.trains_base or m.uses_targets, adapter_bytes_per_token=per_token,
                           mask_bytes=1 if device == "cuda" else elt)
    d.update({"activations.blocks": act.blocks, "activations.outside": act.outside,
              "activations.adapters": act.adapters})
    torch_adamw = optim in ("adamw", "adam") and not any(t.projected for t in ledger.trainables)
    workspace = _workspace(ledger.trainables, n_states, elt, rank, device, torch_adamw)
    if compensated and ledger.trainables:
        workspace += _compensation_workspace(ledger.trainables, elt, rank, bf16_update)
    setting = {"model": spec.name, "method": method, "optim": optim, "dtype": dtype, "batch_size": batch_size,
               "seq_len": seq_len, "activation_checkpointing": activation_checkpointing, "rank": rank,
               "quantize": quantize, "device": device}
    replaced = sum(p.numel for p in targets_l) if m.replaces_targets else 0
    n_train = sum(t.numel for t in ledger.trainables)  # DLRT's K, L included: they get gradients and states
    n_total = spec.num_params - replaced + added  # frozen adapter tensors (VeRA's A, B; DLRT's U, V) not counted
    head_grads = sum(t.numel for t in ledger.trainables if any(p.name == t.name and p.is_head for p in spec.params))
    return MemoryReport(weights, gradients, states, act.total, workspace, n_total, n_train, setting,
                        dict(d), backward_start_gradients=head_grads * elt + step_extra,
                        step_in_backward=layerwise and not ddp)


def _accumulates_low_rank(optim: str) -> bool:
    from ..optim.registry import specs

    spec = specs().get(optim)
    return bool(spec is not None and spec.low_rank_accumulation)


def _gradient_bytes(trainables: list[_Trainable], elt: int, rank: int, layerwise: bool, grad_accum: int,
                    low_rank: bool) -> int:
    """Gradient bytes at the peak. Ordinary step: every gradient (accumulation sums into them). ``--layerwise``:
    the largest one (under DDP its buckets hold every gradient: pass ``layerwise=False``); with ``--grad-accum``
    also the accumulators held between micro-batches (leantrain/layerwise.py), in the gradient's dtype: the full
    gradient of each tensor, except r x max(m, n) for a matrix the optimizer projects when it accumulates low-rank."""
    sizes = [t.numel * elt for t in trainables]
    if not layerwise:
        return sum(sizes)
    held = 0
    if grad_accum > 1:
        held = sum(elt * rank * max(t.shape) if t.projected and low_rank else t.numel * elt for t in trainables)
    return max(sizes, default=0) + held


# Transient bytes per element of the largest weight while the bf16 compensation steps it (leantrain/precision.py):
# its fp32 copy and fp32 gradient (4 + 4), then stochastic rounding's int32 noise, sum and masked result (3 x 4)
# or Kahan's fp32 re-read, residual and bf16 buffer (4 + 4 + 2). Measured: 20.0 B at llama-60m (CPU profiler).
COMPENSATION_BYTES = {"stochastic": 20, "kahan": 18}


def _compensation_workspace(trainables: list[_Trainable], elt: int, rank: int, mode: str) -> int:
    """What the compensated bf16 update adds to the step workspace: its fp32 copies replace the fp32 copy of a
    non-fp32 parameter that ``_workspace`` counts (on the low-rank size for projected ones)."""
    lowrank = [max(t.shape) * rank if t.projected else t.numel for t in trainables]
    plain_copy = 4 * max(lowrank) if elt != 4 else 0
    return COMPENSATION_BYTES[mode] * max(t.numel for t in trainables) - plain_copy


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


def estimate_config(cfg: Any, num_labels: int = 2, vocab_size: int | None = None, **overrides: Any) -> MemoryReport:
    """Estimate for a ``TrainConfig`` (one micro-batch of ``batch_size × max_length``); keywords override.

    A scratch preset is estimated with ``vocab_size`` (the corpus vocabulary, known once the data is read) or
    else GaLore's 32000, an upper bound for the corpora leantrain ships."""
    kwargs: dict[str, Any] = {"method": cfg.method, "optim": cfg.optim, "batch_size": cfg.batch_size,
                              "seq_len": cfg.max_length, "activation_checkpointing": cfg.activation_checkpointing,
                              "rank": cfg.rank, "quantize": cfg.quantize, "targets": cfg.targets,
                              "fraction": cfg.fraction, "block_size": cfg.block_size, "num_labels": num_labels,
                              "dtype": cfg.weight_dtype,
                              "layerwise": cfg.layerwise, "bf16_update": cfg.bf16_update,
                              "state_dtype": cfg.state_dtype, "grad_accum": cfg.grad_accum,
                              "ddp": _under_ddp(cfg), "extra": dict(cfg.extra),
                              "dlrt_freeze_other": bool(cfg.extra.get("dlrt_freeze_other", False))}
    kwargs.update(overrides)
    return estimate(config_model_spec(cfg, num_labels, vocab_size), **kwargs)


def _under_ddp(cfg: Any) -> bool:
    """The run is one of several torchrun processes under DDP (whose buckets keep every gradient)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.strategy in ("auto", "ddp")


def config_model_spec(cfg: Any, num_labels: int = 2, vocab_size: int | None = None) -> ModelSpec:
    """The ModelSpec a run builds: a scratch preset, SmolLM2's cached folder, or ``--model`` itself."""
    if cfg.init_weights == "scratch":
        from ..lm.presets import PREFIX, preset_key

        return model_spec(PREFIX + preset_key(cfg.preset), num_labels, vocab_size)
    if cfg.model == "smollm2":
        from ..lm.models import smollm2_dir  # the converted cache; absent until the first SmolLM2 run

        return model_spec(str(smollm2_dir()), num_labels)
    return model_spec(cfg.model, num_labels)
