"""torchrun with 2 gloo processes on CPU: same trajectory as 1 process with the same global batch, and
checkpoints that resume on a different number of processes (2 -> 1, 1 -> 2)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from leantrain.cli import main
from leantrain.report import read_jsonl

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")

# dropout off everywhere: with dropout, 1 x 8 rows and 2 x 4 rows draw different random masks
BASE = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--lr", "1e-3", "--steps", "4", "--dropout", "0", "--model-dropout", "0"]


def torchrun(args: list[str], nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "leantrain", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) < tol
    wa, wb = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < tol


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Reference: 1 process, full fine-tuning, global batch 8, checkpoint at step 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *BASE, "--method", "full", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, strategy):
    out = tmp_path / strategy
    torchrun([*BASE, "--method", "full", "--strategy", strategy, "--out", str(out)])
    assert_same_run(single, out)


def test_fsdp_checkpoint_resumes_on_one_process(tmp_path, single):
    out = tmp_path / "run"
    torchrun([*BASE, "--method", "full", "--strategy", "fsdp", "--save-every", "2", "--stop-at", "2",
              "--out", str(out)])
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert_same_run(single, out)


def test_single_process_checkpoint_resumes_on_two(tmp_path, single):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--method", "full", "--save-every", "2", "--stop-at", "2", "--out", str(out)]) == 0
    torchrun(["--out", str(out), "--resume", "--no-progress"])
    assert_same_run(single, out)


# LoRA/DoRA are not in this list: their final weights differ by up to 1.02e-5 (> 1e-5) while losses agree to
# 1.2e-7. The measured cause is Adam's first step lr*g/(|g|+eps) on near-zero gradients (slope lr/eps), which turns
# a 2.2e-10 rounding difference of the averaged gradient into 1.02e-5; tests/test_dlrt_ddp.py
# (test_lora_weight_gap_under_ddp_is_adams_amplification_of_rounding) checks every weight entry against that
# mechanism's bound, computed from both runs' gradients and Adam denominators.
@pytest.mark.slow
@pytest.mark.parametrize("method, optim", [("miss", "adamw"), ("shira", "adamw"), ("full", "adamw8bit"),
                                           ("full", "galore-adamw"), ("gradnormlorp", "adamw")])
def test_methods_under_ddp(tmp_path, method, optim):
    ref, out = tmp_path / "one", tmp_path / "two"
    args = [*BASE, "--method", method, "--optim", optim]
    assert main(["train", *args, "--out", str(ref)]) == 0
    torchrun([*args, "--strategy", "ddp", "--out", str(out)])
    assert_same_run(ref, out)
