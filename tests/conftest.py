"""Shared fixtures: offline Hugging Face, quiet tokenizers, and tiny configs for fast CLI runs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny test models gain nothing from two, and subprocesses started by tests inherit the same
# setting, which keeps in-process vs subprocess comparisons bit-exact.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


TINY_ARGS = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24",
             "--batch-size", "8", "--no-progress"]


@pytest.fixture
def tiny_args():
    """CLI options for a seconds-long run on a random 2-layer BERT and a small slice of the sentiment data."""
    return list(TINY_ARGS)


@pytest.fixture
def one_line_error():
    """check(code, err, *needles): the CLI exited 2 with exactly one ``leantrain: error:`` line naming each needle."""
    def check(code: int, err: str, *needles: str) -> None:
        assert code == 2 and err.startswith("leantrain: error: ") and err.count("\n") == 1, err
        for needle in needles:
            assert needle in err, (needle, err)

    return check


BIBLE_NAMES = ["moses", "aaron", "david", "ruth", "jacob", "sarah"]


@pytest.fixture(scope="session")
def bible_corpus(tmp_path_factory):
    """A toy KJV-like corpus (300 seeded lines over six names) for seconds-long scratch causal-LM runs."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"and {a} said unto {b} , behold the lord is with {b} .\n"
                            for a, b in (rng.sample(BIBLE_NAMES, 2) for _ in range(300))))
    return path
