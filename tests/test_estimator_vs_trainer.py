"""Issue 19 item 6 at test scale: the estimator's optimizer-state and weight bytes equal what the trainer
allocates for the same flags (small LLaMA, corpus vocabulary), in fp32 and bf16, for every registered optimizer
(issue 22: Muon's AdamW side, APOLLO-Mini's rank 1, Flora's compressed momentum, Adam-mini's blocks are declared
by each optimizer's spec, ``OptimizerSpec.state_bytes``)."""
from __future__ import annotations

import pytest
import torch

from leantrain.config import TrainConfig
from leantrain.dist_utils import local_bytes, optimizer_state_bytes_local
from leantrain.loop import Closure
from leantrain.memory import estimate_config
from leantrain.optim.registry import available_optimizers
from leantrain.run import build_run

NANO = {"task": "causal-lm", "init_weights": "scratch", "preset": "small", "method": "full", "train_size": 8,
        "val_size": 4, "batch_size": 2, "max_length": 64, "progress": False, "rank": 16}


PRECISIONS = [("fp32", "plain"), ("bf16", "plain"), ("bf16", "stochastic"), ("bf16", "kahan")]
# every registered optimizer in fp32; the bf16 variants for the plain / 8-bit / 4-bit / projected layouts
CASES = [(o, "fp32", "plain") for o in available_optimizers()] + [
    (o, d, u) for o in ("adamw", "adamw8bit", "adamw4bit", "galore-adamw", "galore-adamw8bit") for d, u in PRECISIONS[1:]]


@pytest.mark.parametrize("optim,dtype,update", CASES)
def test_estimated_states_and_weights_match_the_trainer(optim: str, dtype: str, update: str) -> None:
    """bf16 compensation steps fp32 copies (projector bases fp32) and Kahan adds 2 bytes per weight."""
    cfg = TrainConfig(optim=optim, dtype=dtype, bf16_update=update, **NANO)
    run = build_run(cfg)
    run.optimizer.step(Closure.for_run(run))  # states are created on the first step
    report = estimate_config(cfg, vocab_size=int(run.model.config.vocab_size))
    weights = local_bytes(run.model.parameters()) + local_bytes(run.model.buffers())
    assert report.weights == weights
    assert report.optimizer_states == pytest.approx(optimizer_state_bytes_local(run.optimizer), rel=0.01)


@pytest.mark.parametrize("optim", ["adamw", "galore-adamw", "muon"])
def test_state_dtype_bf16_halves_plain_moments_as_estimated(optim: str) -> None:
    """--state-dtype bf16: the moments are bf16 tensors, and the estimator counts 2 bytes for them."""
    cfg = TrainConfig(optim=optim, state_dtype="bf16", **NANO)
    run = build_run(cfg)
    run.optimizer.step(Closure.for_run(run))
    moments = [t for s in run.optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    report = estimate_config(cfg, vocab_size=int(run.model.config.vocab_size))
    assert report.optimizer_states == pytest.approx(optimizer_state_bytes_local(run.optimizer), rel=0.01)
