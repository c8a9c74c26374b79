"""Activation memory of transformer training: bytes autograd keeps between forward and backward.

Model (per layer, per token), following Korthikanti et al., *Reducing Activation Recomputation in Large
Transformer Models* (MLSys 2023, arXiv 2205.05198, Sec. 4.1), generalised to any element size ``e`` (bytes of the
compute dtype), FFN width ``f`` and to the LLaMA block; ``h`` hidden, ``a`` heads, ``s`` sequence length,
``kv`` = ``num_key_value_heads·head_dim``. Dropout masks cost ``d`` bytes per element: 1 on CUDA (bool mask of
``native_dropout``), ``e`` on CPU (``at::dropout`` there multiplies by a saved noise tensor of the input dtype).

BERT block (post-LN, GELU, dropout), eager attention -- the paper's ``sbh(34 + 5as/h)`` at e = 2, f = 4h::

    e·(8h + 2f)              inputs of Q/K/V (shared), Q, K, V, out-proj, fc1, LN1, LN2 and GELU in / fc2 in
    + 2h·d                   two hidden-size dropout masks
    + (2e + d)·a·s           softmax output, attention-dropout output and its mask (an s×s map per head)

LLaMA block (pre-RMSNorm, SwiGLU, RoPE, no dropout)::

    e·(6h + 2kv + 4f)        block input, norm-1 out (= Q/K/V input), Q, K, V, attention out (= o_proj input),
                             norm-2 input and output (= gate/up input), gate out, SiLU out, up out, down input
    + e·a·s                  softmax output (eager attention)

``attention="flash"`` (SDPA flash / memory-efficient kernels) replaces every s×s term by the saved
attention output (e·h) and log-sum-exp (4·a bytes) per token.

Full activation checkpointing of every block (HF ``gradient_checkpointing_enable()``): only each block's input
(e·h per token per layer) is kept, plus one block's activations while it is recomputed in backward.

Outside the blocks (per token): BERT classifier: embedding LayerNorm input/output and its dropout mask
(2e·h + h·d) plus the masked-mean-pooling product (e·h). Causal LM: final norm input/output (2e·h), logits (e·V,
they are returned to the caller) and the fp32 log-softmax kept by cross-entropy (4·V).

Adapters add their own intermediates per adapted Linear and token (``adapter_bytes_per_token``), e.g. LoRA's
``A·x`` (e·r). A frozen encoder (method ``head``) keeps nothing but the head input.

The GaLore paper's Table 2 counts no activations at all (weights + optimizer states only); see docs/memory.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from .modelspec import ModelSpec


@dataclass
class ActivationBreakdown:
    per_layer: int  # bytes of one block's saved tensors for the whole batch
    blocks: int  # bytes kept for all blocks (after checkpointing)
    outside: int  # embeddings / head / loss
    adapters: int  # adapter intermediates

    @property
    def total(self) -> int:
        return self.blocks + self.outside + self.adapters


def block_bytes_per_token(spec: ModelSpec, seq_len: int, elt: int, attention: str = "eager",
                          mask_bytes: int = 1) -> int:
    """Bytes one transformer block keeps per token (the formulas in the module docstring)."""
    h, f, a = spec.hidden, spec.intermediate, spec.heads
    head_dim = h // a if a else h
    kv = (spec.kv_heads or a) * head_dim
    if spec.family == "llama":
        dense = elt * (6 * h + 2 * kv + 4 * f)
    else:  # BERT-style post-LN block; also the fallback for "generic" encoders
        dense = elt * (8 * h + 2 * f)
    masks = 2 * h * mask_bytes if spec.dropout else 0
    if attention == "flash":
        attn = elt * h + 4 * a
    elif attention == "eager":
        attn = ((2 * elt + mask_bytes) if spec.dropout else elt) * a * seq_len
    else:
        raise ValueError(f"attention={attention!r} must be 'eager' or 'flash'")
    return dense + masks + attn


def outside_bytes_per_token(spec: ModelSpec, elt: int, mask_bytes: int = 1) -> int:
    h = spec.hidden
    if spec.causal_lm:
        return 2 * elt * h + elt * spec.vocab + 4 * spec.vocab
    return 3 * elt * h + (h * mask_bytes if spec.dropout else 0)


def activation_bytes(spec: ModelSpec, batch_size: int, seq_len: int, elt: int, checkpointing: bool = False,
                     attention: str = "eager", trainable_encoder: bool = True,
                     adapter_bytes_per_token: int = 0, mask_bytes: int = 1) -> ActivationBreakdown:
    """Saved-for-backward bytes of one micro-batch of ``batch_size × seq_len`` tokens."""
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be > 0")
    tokens = batch_size * seq_len
    if not trainable_encoder:  # nothing upstream of the head needs a gradient: autograd saves only the head input
        return ActivationBreakdown(0, 0, batch_size * spec.hidden * elt, 0)
    per_layer = tokens * block_bytes_per_token(spec, seq_len, elt, attention, mask_bytes)
    if checkpointing:
        blocks = spec.layers * tokens * elt * spec.hidden + per_layer
    else:
        blocks = spec.layers * per_layer
    outside = tokens * outside_bytes_per_token(spec, elt, mask_bytes)
    adapters = tokens * adapter_bytes_per_token
    if checkpointing:  # adapter intermediates are recomputed with their block too
        adapters = adapters // max(spec.layers, 1)
    return ActivationBreakdown(per_layer, blocks, outside, adapters)
