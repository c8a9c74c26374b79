"""--layerwise under torchrun (leantrain/layerwise.py): DDP's communication hook and FSDP2's post-reduce-scatter
hooks step each parameter after its gradient is synchronised, so the run equals the ordinary distributed run
step for step; non-finite gradients or losses on one rank stop or skip every rank alike, without a hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantrain.cli import main
from leantrain.config import TrainConfig
from leantrain.layerwise import LayerwiseStep
from leantrain.precision import wrap_for_dtype
from leantrain.report import read_jsonl

WORKER = Path(__file__).with_name("layerwise_dist_worker.py")
# the launcher pattern of tests/test_distributed.py: tiny model, dropout off, global batch 8 over 2 processes
BASE = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--lr", "1e-3", "--steps", "4", "--dropout", "0", "--model-dropout", "0", "--method", "full"]
TOL = 1e-6  # issue #20: per-step losses and final weights of layerwise vs ordinary, same strategy


def torchrun(args: list[str], nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train(args: list[str]) -> None:
    torchrun(["-m", "leantrain", "train", *args])


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(max per-step loss difference, max final weight difference) of two run folders."""
    la = [(r["step"], r["loss"]) for r in read_jsonl(a / "metrics.jsonl") if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in read_jsonl(b / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    wa, wb = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    assert wa.keys() == wb.keys()
    return (max(abs(x - y) for (_, x), (_, y) in zip(la, lb)),
            max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa))


@pytest.mark.parametrize("change,match", [
    ({"strategy": "ddp", "method": "dlrt"}, "changes parameter shapes"),
])
def test_what_stays_refused_under_torchrun(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        TrainConfig(layerwise=True, **change)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_compensated_bf16_step_keeps_the_gradient_accumulator(mode: str) -> None:
    """DDP (and layerwise) hang their hooks on each parameter's gradient accumulator. The bf16 compensated step
    once swapped ``p.data`` to fp32 and back, which makes autograd build a new accumulator: from step 2 on DDP
    reduced nothing and ranks drifted apart. The accumulator -- and a hook on it -- must survive a step."""
    model = torch.nn.Linear(4, 4).bfloat16()
    optimizer = wrap_for_dtype(torch.optim.SGD(model.parameters(), lr=0.1), "bf16", mode, 0)
    fired, accumulators = [], []  # kept alive, as DDP's reducer does (the tensor holds its accumulator weakly)
    for p in model.parameters():
        accumulators.append(p.view_as(p).grad_fn.next_functions[0][0])
        accumulators[-1].register_hook(lambda *_: fired.append(1))
    for _ in range(3):
        model(torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert len(fired) == 3 * 2
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_backward_that_steps_nothing_fails_loudly() -> None:
    """If the step hooks stop firing (a torch that no longer calls them from FSDP2's reduce-scatter, DDP's hooks
    detached), the loop's ``finish`` raises instead of training on nothing."""
    model = torch.nn.Linear(4, 1)
    hooks = LayerwiseStep(torch.optim.SGD(model.parameters(), lr=0.1), model, strategy="fsdp", world=2).register()
    hooks.remove()
    hooks.start_step(0)
    model(torch.ones(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="step 1: --layerwise: no step hook fired"):
        hooks.finish()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,optim", [("ddp", "adamw"), ("ddp", "galore-adamw"), ("ddp", "galore-adamw8bit"),
                                            ("fsdp", "adamw"), ("fsdp", "galore-adamw"),
                                            ("fsdp", "galore-adamw8bit")])
def test_layerwise_equals_the_ordinary_distributed_run(tmp_path, strategy: str, optim: str) -> None:
    args = [*BASE, "--optim", optim, "--grad-clip", "none", "--strategy", strategy]
    train([*args, "--out", str(tmp_path / "ordinary")])
    train([*args, "--layerwise", "--out", str(tmp_path / "layerwise")])
    loss_diff, weight_diff = differences(tmp_path / "ordinary", tmp_path / "layerwise")
    assert loss_diff <= TOL and weight_diff <= TOL, (loss_diff, weight_diff)
    ordinary = json.loads((tmp_path / "ordinary" / "metrics.json").read_text())
    layerwise = json.loads((tmp_path / "layerwise" / "metrics.json").read_text())
    if strategy == "fsdp":  # one reduce-scattered shard alive at a hook: the largest, rank 0's half the embedding
        assert layerwise["layerwise_peak_grad_bytes"] < ordinary["grad_bytes"]
    else:  # DDP keeps its gradient buckets: one full gradient per rank, as bucket views
        assert layerwise["layerwise_peak_grad_bytes"] == ordinary["grad_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_per_parameter_clipping_matches_one_process(tmp_path, strategy: str) -> None:
    """--grad-clip C clips each parameter's *synchronised* gradient (under FSDP2 the norm of the whole parameter):
    2 processes follow 1 layerwise process with the same global batch (to the 1e-5 of tests/test_distributed.py,
    which 2 half-batch gradients instead of one 8-row mean allow)."""
    args = [*BASE, "--optim", "adamw", "--grad-clip", "0.05", "--layerwise"]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    train([*args, "--strategy", strategy, "--out", str(tmp_path / "two")])
    loss_diff, weight_diff = differences(tmp_path / "one", tmp_path / "two")
    assert loss_diff < 1e-5 and weight_diff < 1e-5, (loss_diff, weight_diff)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_on_one_rank(tmp_path, strategy: str, policy: str) -> None:
    """Rank 0's gradient of 2.weight gets a NaN at step 2 (under FSDP2 only in rank 0's shard), rank 1's loss is
    NaN at step 3: every rank skips the same updates (skip) or raises at step 2 (stop); none hangs or diverges."""
    torchrun([str(WORKER), strategy, policy, str(tmp_path)])
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["ranks_agree"]
        if policy == "stop":
            assert r["error"].startswith("step 2: non-finite gradient in 2.weight") and len(r["losses"]) == 1
            continue
        assert r["error"] is None and r["skipped_updates"] == 1
        assert [r[f"2.weight_changed_{s}"] for s in range(4)] == [True, False, False, True]
        assert r["losses"][2] != r["losses"][2] and r["losses"][3] == r["losses"][3]  # NaN at step 3 only
    assert results[0]["losses"][:2] == results[1]["losses"][:2]
