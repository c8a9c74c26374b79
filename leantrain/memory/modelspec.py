"""Describe a model as the list of its tensors (shapes only), without loading or allocating any weights.

The estimator needs three facts about a model: every parameter's shape and owning module (to decide what a
method trains, adapts or quantizes), every buffer's size, and the transformer geometry (hidden size, layers,
heads, FFN width, vocabulary) for the activation model. We get them three ways:

* ``from_hf_config``: analytic layouts of the two families leantrain trains (BERT encoders behind leantrain's
  ``SequenceClassifier``, LLaMA causal LMs); exact and instant (no transformers import). Other ``model_type``s
  are built by transformers on the ``meta`` device (no storage) and walked.
* ``from_module``: walk any ``nn.Module`` (real or meta) -- used to check the analytic layouts and to estimate the
  very model a test measures.
* ``model_spec(name)``: presets (``llama-60m`` … ``llama-7b``: the configs of the GaLore repository,
  ``jiaweizzhao/GaLore/configs/llama_*.json``), ``minilm``/``tiny`` (leantrain's embedded encoders), or a folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..lm.presets import PREFIX, PRESETS, hf_config_dict, preset_key
from ..targets import Targets, is_head, select

if TYPE_CHECKING:  # torch is imported only where a module is walked, so the estimator CLI starts fast
    from torch import nn

# jiaweizzhao/GaLore configs/llama_{60m,130m,350m,1b,7b}.json (vocab 32000, SiLU, RMSNorm eps 1e-6, untied head);
# the one table is leantrain/lm/presets.py (the trainer builds the same models).
PAPER_SIZES = ("60m", "130m", "350m", "1b", "7b")
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    f"{PREFIX}{k}": {"hidden_size": PRESETS[k][0], "intermediate_size": PRESETS[k][1],
                     "num_attention_heads": PRESETS[k][3], "num_hidden_layers": PRESETS[k][2]} for k in PAPER_SIZES}
# leantrain.models.load_encoder("tiny"): a random 2-layer BERT with MiniLM's vocabulary.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": 128, "type_vocab_size": 2}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    module: str  # owning module's qualified name
    kind: str  # "linear" (a Linear's weight), "bias", "embedding", "norm", "other"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_head(self) -> bool:
        """Owned by a task head (``leantrain.targets.is_head``): heads are not adapted."""
        return is_head(self.module)


@dataclass
class ModelSpec:
    """Parameters, buffers (name -> (numel, bytes per element)) and transformer geometry of a model."""

    name: str
    params: list[ParamSpec]
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)
    family: str = "generic"  # "bert" | "llama" | "generic"
    causal_lm: bool = False
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    num_labels: int = 0
    dropout: bool = False  # dropout layers active in training (their masks are stored)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    def linears(self) -> list[ParamSpec]:
        """Weights of every nn.Linear (head included), shape (out, in)."""
        return [p for p in self.params if p.kind == "linear"]

    def target_modules(self, targets: Targets) -> list[str]:
        """Names of the Linear modules ``targets`` selects, by the rule the training code applies to the real
        model (``leantrain.targets``), so an estimate covers the layers a run would adapt."""
        return select(((p.module, p) for p in self.linears()), targets, owner=self.name, what="Linear")


def _bert_params(cfg: dict[str, Any], prefix: str = "encoder.") -> list[ParamSpec]:
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    out: list[ParamSpec] = []

    def lin(mod: str, i: int, o: int) -> None:
        out.append(ParamSpec(f"{prefix}{mod}.weight", (o, i), prefix + mod, "linear"))
        out.append(ParamSpec(f"{prefix}{mod}.bias", (o,), prefix + mod, "bias"))

    def norm(mod: str) -> None:
        out.append(ParamSpec(f"{prefix}{mod}.weight", (h,), prefix + mod, "norm"))
        out.append(ParamSpec(f"{prefix}{mod}.bias", (h,), prefix + mod, "norm"))

    for mod, rows in (("word_embeddings", cfg["vocab_size"]), ("position_embeddings", cfg["max_position_embeddings"]),
                      ("token_type_embeddings", cfg.get("type_vocab_size", 2))):
        out.append(ParamSpec(f"{prefix}embeddings.{mod}.weight", (rows, h), f"{prefix}embeddings.{mod}", "embedding"))
    norm("embeddings.LayerNorm")
    for i in range(L):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            lin(p + "attention.self." + m, h, h)
        lin(p + "attention.output.dense", h, h)
        norm(p + "attention.output.LayerNorm")
        lin(p + "intermediate.dense", h, f)
        lin(p + "output.dense", f, h)
        norm(p + "output.LayerNorm")
    return out


def _llama_params(cfg: dict[str, Any]) -> list[ParamSpec]:
    h, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    a = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or a
    d = cfg.get("head_dim") or h // a
    out = [ParamSpec("model.embed_tokens.weight", (V, h), "model.embed_tokens", "embedding")]
    for i in range(L):
        p = f"model.layers.{i}."
        for m, o, inp in (("self_attn.q_proj", a * d, h), ("self_attn.k_proj", kv * d, h),
                          ("self_attn.v_proj", kv * d, h), ("self_attn.o_proj", h, a * d),
                          ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)):
            out.append(ParamSpec(p + m + ".weight", (o, inp), p + m, "linear"))
        for m in ("input_layernorm", "post_attention_layernorm"):
            out.append(ParamSpec(p + m + ".weight", (h,), p + m, "norm"))
    out.append(ParamSpec("model.norm.weight", (h,), "model.norm", "norm"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(ParamSpec("lm_head.weight", (V, h), "lm_head", "linear"))
    return out


def from_hf_config(cfg: dict[str, Any], name: str = "model", num_labels: int = 2) -> ModelSpec:
    """Spec of a transformers config dict: BERT -> leantrain classifier (encoder + head), LLaMA -> causal LM."""
    mtype = cfg.get("model_type", "")
    if mtype == "llama":
        a = cfg["num_attention_heads"]
        spec = ModelSpec(name, _llama_params(cfg), family="llama", causal_lm=True)
        d = cfg.get("head_dim") or cfg["hidden_size"] // a
        spec.buffers = {"model.rotary_emb.inv_freq": (d // 2, 4), "model.rotary_emb.original_inv_freq": (d // 2, 4)}
        spec.kv_heads = cfg.get("num_key_value_heads") or a
        spec.dropout = bool(cfg.get("attention_dropout", 0.0))
    elif mtype == "bert":
        params = _bert_params(cfg)
        h = cfg["hidden_size"]
        params += [ParamSpec("classifier.weight", (num_labels, h), "classifier", "linear"),
                   ParamSpec("classifier.bias", (num_labels,), "classifier", "bias")]
        spec = ModelSpec(name, params, family="bert", num_labels=num_labels)
        P = cfg["max_position_embeddings"]
        spec.buffers = {"encoder.embeddings.position_ids": (P, 8), "encoder.embeddings.token_type_ids": (P, 8)}
        spec.kv_heads = cfg["num_attention_heads"]
        spec.dropout = cfg.get("hidden_dropout_prob", 0.1) > 0 or cfg.get("attention_probs_dropout_prob", 0.1) > 0
    else:  # any other architecture: build it on the meta device; geometry comes from its config object
        spec = from_module(_meta_build(cfg), name)
        spec.family = "generic"
        return spec
    spec.hidden, spec.layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    spec.heads, spec.intermediate = cfg["num_attention_heads"], cfg.get("intermediate_size", 4 * cfg["hidden_size"])
    spec.vocab = cfg.get("vocab_size", 0)
    spec.kv_heads = spec.kv_heads or spec.heads
    return spec


def _meta_build(cfg: dict[str, Any]) -> nn.Module:
    """Instantiate an arbitrary transformers config on the meta device (no memory, no download)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    causal = any(a.endswith("ForCausalLM") for a in (cfg.get("architectures") or []))
    with torch.device("meta"):
        return (AutoModelForCausalLM if causal else AutoModel).from_config(config)


def _kind(module: nn.Module, pname: str) -> str:
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear" if pname == "weight" else "bias"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    return "bias" if pname == "bias" else "other"


def from_module(model: nn.Module, name: str | None = None) -> ModelSpec:
    """Walk a module (real or meta): shared parameters are counted once, as in ``model.parameters()``."""
    from torch import nn

    params: list[ParamSpec] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            params.append(ParamSpec(full, tuple(p.shape), mname, _kind(module, pname)))
    buffers = {n: (b.numel(), b.element_size()) for n, b in model.named_buffers()}
    spec = ModelSpec(name or type(model).__name__, params, buffers)
    cfg = getattr(model, "config", None) or getattr(getattr(model, "encoder", None), "config", None)
    if cfg is not None:
        spec.hidden = getattr(cfg, "hidden_size", 0)
        spec.layers = getattr(cfg, "num_hidden_layers", 0)
        spec.heads = getattr(cfg, "num_attention_heads", 0)
        spec.kv_heads = getattr(cfg, "num_key_value_heads", None) or spec.heads
        spec.intermediate = getattr(cfg, "intermediate_size", 4 * spec.hidden)
        spec.vocab = getattr(cfg, "vocab_size", 0)
        mtype = getattr(cfg, "model_type", "")
        spec.family = mtype if mtype in ("bert", "llama") else "generic"
        spec.causal_lm = any(n.startswith("lm_head") for n, _ in model.named_parameters())
        spec.dropout = getattr(cfg, "hidden_dropout_prob", 0.0) > 0 or getattr(cfg, "attention_dropout", 0.0) > 0
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        spec.num_labels = head.out_features
    return spec


def _read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def model_spec(name: str, num_labels: int = 2, vocab_size: int | None = None) -> ModelSpec:
    """Resolve ``llama-<size>`` (``vocab_size``: a scratch run's corpus vocabulary, else GaLore's 32000),
    ``minilm``, ``tiny`` or a folder with config.json to a ModelSpec."""
    if name.startswith(PREFIX) and name.removeprefix(PREFIX) in PRESETS:
        key = preset_key(name)
        return from_hf_config(hf_config_dict(key, vocab_size or 32000), PREFIX + key)
    if name in ("minilm", "tiny"):
        from ..models import resolve_model_dir

        cfg = _read_config(resolve_model_dir(name))
        if name == "tiny":
            cfg = {**cfg, **TINY_BERT}
        return from_hf_config(cfg, name, num_labels)
    path = Path(name)
    if not (path / "config.json").is_file():
        known = ", ".join([*LLAMA_PRESETS, "minilm", "tiny"])
        raise ValueError(f"unknown model {name!r}: give a preset ({known}) or a folder with config.json")
    return from_hf_config(_read_config(path), path.name, num_labels)


def available_models() -> list[str]:
    return [*LLAMA_PRESETS, "minilm", "tiny"]
