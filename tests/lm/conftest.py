"""A small synthetic corpus the nano LLaMA can learn in a few dozen steps (MiniLM's tokenizer, always installed)."""
from __future__ import annotations

import random

import pytest

from leantrain.config import TrainConfig

WORDS = ["moses", "aaron", "david", "ruth", "jacob", "sarah"]


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        a, b = rng.sample(WORDS, 2)
        lines.append(f"and {a} said unto {b} , behold the lord is with {b} .")
    path = tmp_path_factory.mktemp("lm") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def lm_config():
    return make_lm_config


def make_lm_config(corpus, out, **kw) -> TrainConfig:
    base = {"task": "causal-lm", "model": "minilm", "data": str(corpus), "init_weights": "scratch", "arch": "llama",
                "preset": "nano", "method": "full", "optim": "adamw", "lr": 3e-3, "steps": 30, "batch_size": 8, "max_length": 16,
                "train_size": None, "val_size": 16, "warmup_ratio": 0.0, "out": str(out), "progress": False, "overwrite": True}
    base.update(kw)
    return TrainConfig(**base)
