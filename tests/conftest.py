"""Shared fixtures: offline Hugging Face, quiet tokenizers, and tiny configs for fast CLI runs."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny test models gain nothing from two, and subprocesses started by tests inherit the same
# setting, which keeps in-process vs subprocess comparisons bit-exact.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
