"""Faults that really happen: SIGKILL mid-run, a full disk while checkpointing, non-finite losses."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from leantrain import checkpoint as ckpt
from leantrain.cli import main
from leantrain.report import read_jsonl

TINY = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--method", "full", "--lr", "1e-3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}  # same thread count as this process: bit-exact comparisons


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def train_proc(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leantrain", "train", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_after_checkpoint(out: Path, args: list[str], min_step: int, delay: float) -> None:
    """Start a run, wait until a checkpoint of at least `min_step` exists, then SIGKILL it after `delay` s."""
    proc = train_proc(args)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt.latest_checkpoint(out)
        if latest is not None and latest.is_dir() and int(latest.name.split("-")[1]) >= min_step:
            break
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *TINY, "--steps", "12", "--out", str(out)]) == 0
    return out


def _kill_and_resume(tmp_path: Path, reference: Path, seed: int) -> None:
    rng = random.Random(seed)
    out = tmp_path / f"killed-{seed}"
    args = [*TINY, "--steps", "12", "--save-every", "1", "--out", str(out)]
    kill_after_checkpoint(out, args, min_step=rng.randint(1, 8), delay=rng.uniform(0.0, 0.4))
    if (out / "metrics.json").exists():
        pytest.skip("the run finished before the kill landed")
    latest = ckpt.latest_checkpoint(out)
    ckpt.verify_checkpoint(latest)  # "latest" is never a half-written checkpoint
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert losses(out) == losses(reference)
    a, b = load_file(reference / "trainable.safetensors"), load_file(out / "trainable.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference):
    _kill_and_resume(tmp_path, reference, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4, 5, 6])
def test_sigkill_at_random_points(tmp_path, reference, seed):
    _kill_and_resume(tmp_path, reference, seed)


def test_disk_full_while_checkpointing_keeps_previous(tmp_path):
    """RLIMIT_FSIZE makes writes past a size fail with EFBIG, as a full disk would (ENOSPC)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--save-every", "2", "--stop-at", "2", "--out", str(out)]) == 0
    good = ckpt.latest_checkpoint(out)
    # full fine-tuning of the tiny model writes a ~4 MB model file: allow 1 MB per file
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "from leantrain.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--out", str(out), "--resume", "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("leantrain: error:")]
    assert err and "too large" in err[0].lower()
    assert ckpt.latest_checkpoint(out) == good
    ckpt.verify_checkpoint(good)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_non_finite_loss_stops_with_step_and_parameter(tmp_path, capsys):
    # lr 1e30 makes the first update blow the weights up, so step 2 sees a non-finite loss
    out = tmp_path / "run"
    code = main(["train", *TINY, "--lr", "1e30", "--head-lr", "1e30", "--grad-clip", "none", "--steps", "4",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leantrain: error: step 2: non-finite") and "--nan-policy skip" in err
    assert not (out / "metrics.json").exists()


def test_non_finite_policy_skip_leaves_optimizer_state_finite(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e30", "--head-lr", "1e30", "--grad-clip", "none", "--steps", "4",
                 "--save-every", "4", "--nan-policy", "skip", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_steps"] >= 1
    opt = load_file(ckpt.latest_checkpoint(out) / "optimizer.safetensors")
    assert opt and all(t.float().isfinite().all() for t in opt.values())
