"""A plain ``leantrain train`` prints nothing on stderr: no import-time chatter from optional peer libraries
(torchao's missing CUDA kernels, torch pytree deprecations) and no progress bar under --no-progress, not even
transformers' weight-loading bar."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("model", ["tiny", "minilm"])  # minilm: transformers' "Loading weights" bar
def test_train_stderr_is_empty(model, tmp_path, tiny_args):
    env = {k: v for k, v in os.environ.items() if k != "LEANTRAIN_VERBOSE"}
    args = [*tiny_args, "--model", model, "--train-size", "32", "--val-size", "16", "--max-length", "16"]
    proc = subprocess.run([sys.executable, "-m", "leantrain", "train", *args, "--steps", "1", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]
    assert "validation accuracy" in proc.stdout


def test_python_api_import_has_no_peer_chatter():
    """The Python API (not only the CLI) keeps torchao's missing-kernel lines and torch's pytree deprecations out
    of the user's stderr when transformers pulls torchao in."""
    pytest.importorskip("torchao")
    code = "import leantrain\nfrom leantrain.models import load_encoder\nload_encoder('tiny')\nimport torchao\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Failed to load" not in proc.stderr and "_pytree" not in proc.stderr, proc.stderr[-2000:]
