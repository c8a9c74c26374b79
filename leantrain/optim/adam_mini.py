"""Adam-mini: Adam with one second-moment value per Hessian block instead of one per weight.

Paper: Y. Zhang et al., *Adam-mini: Use Fewer Learning Rates To Gain More*, ICLR 2025, https://arxiv.org/abs/2406.16793
(partition rules of the reference implementation ``adam_mini`` 1.1.1). For a block b of weights (its gradient g_b):

    m   <- b1 m + (1 - b1) g                     (per weight, as Adam)
    v_b <- b2 v_b + (1 - b2) mean(g_b * g_b)     (one value per block)
    W   <- W (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v_b) / sqrt(1 - b2^t) + eps)

Partition (group key ``partition``, or per tensor when unset):
* ``"row"``: one block per row -- per token for embeddings and the output head, per output neuron for the value,
  output-projection and MLP matrices (the paper's rule); the default for every tensor with ndim >= 2;
* ``"head"``: one block per attention head of query / key matrices: contiguous blocks of ``head_numel`` values
  (= dim * dim / n_heads, the heads' rows), the paper's rule for Q and K;
* ``"tensor"``: one value for the whole tensor (the paper's rule for norm weights); the default for 1-D tensors;
* ``"element"``: plain Adam (the paper's rule for biases).
:func:`adam_mini_groups` applies the paper's name rules to ``model.named_parameters()`` (:func:`partition_of`);
``--optim adam-mini`` applies them to the run's param groups, which carry the parameter ``names`` and the model's
attention ``head_dim`` (set by ``leantrain.run``). One departure from the reference: a matrix whose name is in none
of its lists (e.g. BERT's ``attention.output.dense``) gets one value per row, the paper's rule for "the rest",
where the reference falls back to one value for the whole tensor. No weight decay on norm weights and biases
(the reference's rule).

State: ``exp_avg`` in the group's codec (``AdamMini``: fp32; ``AdamMini8bit``, registered as ``adam-mini``: 8-bit
block-wise, ~1 byte/weight) and ``exp_avg_sq``, fp32, one value per block. FSDP2-sharded (DTensor) parameters are
refused: a "tensor" block would need an all-reduce across shards.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .adam import BlockOptimizer, apply_decoupled
from .spec import (
    STEP_BYTES,
    OptimizerOptions,
    OptimizerSpec,
    StateOptions,
    StateTensor,
    codec_bytes,
    register,
)

PARTITIONS = ("row", "head", "tensor", "element")
EMBED_NAMES = ("embed", "embd", "wte", "lm_head", "output", "final_layer")
QK_NAMES = ("q_proj", "k_proj", "wq", "wk", "query", "key")


def block_numel(p: Tensor, group: dict[str, Any]) -> int:
    """Weights per second-moment block of ``p`` under its group's (or its default) partition."""
    how = group.get("partition") or ("row" if p.ndim >= 2 else "tensor")
    if how == "row":
        return p.numel() // p.shape[0] if p.ndim else 1
    if how == "tensor":
        return p.numel()
    if how == "element":
        return 1
    size = group.get("head_numel")
    if not isinstance(size, int) or size < 1 or p.numel() % size:
        raise ValueError(f"AdamMini: head_numel={size!r} must be a positive int dividing the {tuple(p.shape)} "
                         "tensor's size for partition='head'")
    return size


class AdamMini(BlockOptimizer):
    """Adam-mini with an fp32 first moment (see the module docstring for the rule and the partition)."""

    moments = (("exp_avg", True),)  # the per-weight moment, through the codec; exp_avg_sq is one fp32 per block
    default_codec = "fp32"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, partition: str | None = None,
                 head_numel: int | None = None, block_size: int = 256, min_8bit_size: int = 4096,
                 skip_nonfinite: bool = False, codec: str | None = None) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "partition": partition, "head_numel": head_numel, "block_size": block_size,
                    "min_8bit_size": min_8bit_size, "skip_nonfinite": skip_nonfinite, "codec": codec}
        super().__init__(params, defaults)

    def _check(self, g: dict[str, Any], where: str) -> None:
        super()._check(g, where)
        if g.get("partition") is not None and g["partition"] not in PARTITIONS:
            raise ValueError(f"{type(self).__name__}: unknown partition={g['partition']!r} in {where}; "
                             f"choose one of {', '.join(PARTITIONS)}")
        if g.get("rank") is not None:
            raise ValueError(f"{type(self).__name__}: rank={g['rank']!r} in {where}: Adam-mini does not project")

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        """One step of one tensor: the whole tensor at once (a block's mean needs all of its gradient)."""
        if hasattr(p, "to_local"):
            raise TypeError(f"{type(self).__name__}: FSDP2-sharded parameter of shape {tuple(p.shape)} is not "
                            "supported (a block's mean would need an all-reduce); use DDP")
        state = self.state[p]
        blk = block_numel(p, group)
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            self._init_state(state, group, p.numel(), p)
            state["exp_avg_sq"] = torch.zeros(p.numel() // blk, dtype=torch.float32, device=p.device)
        state["step"] += 1
        t = int(state["step"])
        g = p.grad.float().reshape(-1, blk)
        scale = self._gnorm_scale(g, state, group, t)
        if scale != 1.0:
            g = g * scale
        codec = self._codec(group, p.numel(), True, p)
        enc = self._enc(state, "exp_avg", codec, p.numel())
        m = codec.decode_range(enc, 0, p.numel()).view(g.shape)
        step = self._step_of(g, m, state["exp_avg_sq"], group, t)
        codec.encode_range(enc, 0, m.reshape(-1))
        self._apply(p, step, group)

    @staticmethod
    def _step_of(g: Tensor, m: Tensor, v: Tensor, group: dict[str, Any], t: int) -> Tensor:
        """Update m and v in place; return m_hat / (sqrt(v_hat) + eps), blocks as rows."""
        b1, b2 = group["betas"]
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).add_(g.square().mean(dim=1), alpha=1.0 - b2)
        h = (v.sqrt() / math.sqrt(1.0 - b2**t)).add_(group["eps"])
        return m * ((1.0 / (1.0 - b1**t)) / h).unsqueeze(1)

    @staticmethod
    def _apply(p: Tensor, step: Tensor, group: dict[str, Any]) -> None:
        apply_decoupled(p, step, group["lr"], group.get("weight_decay", 0.0))

    def _check_saved(self, pid: int, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        super()._check_saved(pid, p, st, group)
        want = (p.numel() // block_numel(p, group),)
        got = tuple(st["exp_avg_sq"].shape) if "exp_avg_sq" in st else None
        if got != want:
            raise ValueError(f"{type(self).__name__}.load_state_dict: parameter {pid} (shape {tuple(p.shape)}) has "
                             f"saved exp_avg_sq of shape {got}, expected {want} (one value per block)")


class AdamMini8bit(AdamMini):
    """Adam-mini with the first moment in 8-bit block-wise codes: ~1 byte of state per weight (AdamW8bit: ~2)."""

    default_codec = "8bit"


def partition_of(name: str, ndim: int) -> str:
    """The paper's block of a parameter by its name (``adam_mini``'s keyword lists): biases element-wise (Adam),
    query / key per head, other matrices per row (token of the embedding / output head, output neuron of value,
    attention-output and MLP matrices), other 1-D tensors (norm weights) per tensor."""
    low = name.lower()
    if "bias" in low:
        return "element"
    if any(k in low for k in QK_NAMES):
        return "head"
    return "row" if ndim >= 2 else "tensor"


def decays(name: str) -> bool:
    """The reference's weight-decay rule: none for norm weights and biases."""
    low = name.lower()
    return not ("norm" in low or "ln" in low or "bias" in low)


def named_group(g: dict, name: str, p: Tensor, head_numel: int | None, weight_decay: float | None) -> dict:
    """A one-parameter group with the paper's partition; a Q/K matrix whose size the head block does not divide
    (or no head geometry) falls back to one value per row."""
    part = partition_of(name, p.ndim)
    if part == "head" and (not head_numel or p.numel() % head_numel):
        part = "row"
    out = {**g, "params": [p], "names": [name], "partition": part,
           "head_numel": head_numel if part == "head" else None}
    if not decays(name):
        out["weight_decay"] = 0.0
    elif weight_decay is not None:
        out["weight_decay"] = weight_decay
    return out


def adam_mini_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], dim: int, n_heads: int,
                     weight_decay: float = 0.0) -> list[dict]:
    """The paper's partition from parameter names (:func:`partition_of`; ``head_numel`` = dim * dim / n_heads,
    one head's rows of a query / key matrix), no weight decay for norms and biases."""
    if dim * dim % n_heads:
        raise ValueError(f"adam_mini_groups: dim={dim} squared is not divisible by n_heads={n_heads}")
    return [named_group({}, name, p, dim * dim // n_heads, weight_decay)
            for name, p in named_parameters if p.requires_grad]


def adam_mini_registry_groups(groups: list[dict]) -> list[dict]:
    """The run's groups under the paper's partition. The run assembly gives each group its parameter ``names``
    and the model's attention ``head_dim`` (leantrain.run.name_groups); a Q/K head block is then head_dim whole
    rows (head_dim * in_features values: dim * dim / n_heads for a square matrix, the reference's head_numel).
    Groups without names (the Python API) get one value per row for every matrix and Adam for 1-D tensors: a
    bias (the paper: Adam) cannot be told from a norm weight (the paper: one value) without its name."""
    out = []
    for g in groups:
        names = g.get("names")
        if names is not None and len(names) == len(g["params"]):
            head_dim = g.get("head_dim")
            out += [named_group(g, n, p, head_dim * p.shape[-1] if head_dim and p.ndim >= 2 else None, None)
                    for n, p in zip(names, g["params"])]
            continue
        mats = [p for p in g["params"] if p.ndim >= 2]
        rest = [p for p in g["params"] if p.ndim < 2]
        out += [{**g, "params": ps, "partition": part} for ps, part in ((mats, "row"), (rest, "element")) if ps]
    return out


def build_adam_mini(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    """Adam-mini over :func:`adam_mini_registry_groups`, 8-bit first moment."""
    return AdamMini8bit(adam_mini_registry_groups(groups), lr=lr, betas=opts.betas,
                        weight_decay=opts.weight_decay, block_size=opts.block_size)


def adam_mini_state(t: StateTensor, o: StateOptions) -> tuple[int, int]:
    """Estimator: the 8-bit first moment plus one fp32 second moment per block of the named partition."""
    n = math.prod(t.shape)
    part = partition_of(t.name, len(t.shape))
    if part == "head" and not (o.head_dim and t.shape[0] % o.head_dim == 0):
        part = "row"
    blocks = {"element": n, "tensor": 1, "row": t.shape[0],
              "head": t.shape[0] // (o.head_dim or 1)}[part]
    return STEP_BYTES + codec_bytes("8bit", n, o.block_size) + 4 * blocks, 0


register(OptimizerSpec("adam-mini", build_adam_mini, states=1, codec="8bit", state_bytes=adam_mini_state,
                       summary="Adam-mini: one second moment per head (Q/K), per row (token / output neuron) of the "
                               "other matrices, per norm weight; 8-bit first moment", options=("block_size",)))
