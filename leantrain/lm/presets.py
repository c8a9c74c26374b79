"""The LLaMA presets of ``--init-weights scratch --preset NAME``: one table for the trainer and the estimator.

``nano`` (tests), ``tiny`` (2-5M parameters with the corpus vocabulary, trains on 2 cores), ``small``; and the
GaLore paper's sizes ``60m``..``7b``, identical to jiaweizzhao/GaLore ``configs/llama_*.json`` (vocab 32000 there;
a scratch run's vocabulary is the corpus's). ``llama-7b`` is accepted for ``7b`` (the estimator's spelling).
Pure Python: ``leantrain memory`` reads it without importing torch.
"""
from __future__ import annotations

# name: (hidden, intermediate, layers, heads, context)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (32, 64, 2, 2, 256),
    "tiny": (128, 344, 4, 4, 512),
    "small": (256, 688, 6, 4, 512),
    "60m": (512, 1376, 8, 8, 1024),
    "130m": (768, 2048, 12, 12, 1024),
    "350m": (1024, 2736, 24, 16, 1024),
    "1b": (2048, 5461, 24, 32, 1024),
    "7b": (4096, 11008, 32, 32, 2048),
}
GALORE_VOCAB = 32000
PREFIX = "llama-"


def preset_key(name: str | None) -> str:
    """``7b`` or ``llama-7b`` -> ``7b`` (None -> ``tiny``); unknown names fail in one line listing the choices."""
    key = (name or "tiny").removeprefix(PREFIX)
    if key not in PRESETS:
        raise ValueError(f"--preset {name!r}: choose one of {', '.join(PRESETS)} (a llama- prefix is allowed)")
    return key


def hf_config_dict(name: str, vocab_size: int = GALORE_VOCAB) -> dict:
    """The transformers LlamaConfig fields of a preset (untied head, as in the GaLore configs)."""
    hidden, inter, layers, heads, ctx = PRESETS[preset_key(name)]
    return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "max_position_embeddings": ctx, "tie_word_embeddings": False}
