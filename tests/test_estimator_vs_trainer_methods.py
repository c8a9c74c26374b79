"""The estimator's terms for the pre-training methods that read TrainConfig.extra (ReLoRA, SLTrain) equal what
the trainer allocates for the same flags: weight bytes, optimizer-state bytes, parameter counts (nano LLaMA,
corpus vocabulary). Each case sets an option away from its default, so an estimator that ignored ``extra``
would fail."""
from __future__ import annotations

import pytest

from leantrain.config import TrainConfig
from leantrain.dist_utils import local_bytes, optimizer_state_bytes_local
from leantrain.loop import Closure
from leantrain.memory import estimate_config
from leantrain.run import build_run

NANO = {"task": "causal-lm", "init_weights": "scratch", "preset": "nano", "train_size": 8, "val_size": 4,
        "batch_size": 2, "max_length": 32, "progress": False, "rank": 8, "lr": 3e-3}

CASES = [  # (method, optimizer, dtype, extra)
    ("relora", "adamw", "fp32", {"relora_every": 5}),
    ("relora", "adamw", "fp32", {"relora_every": 5, "relora_warm_start": 3}),  # W trains during the warm start
    # not bf16: LoRA adapters stay fp32 on a bf16 base (lora.adapter_dtype), which the estimator does not model
    ("relora", "adamw8bit", "fp32", {"relora_every": 5, "relora_warm_start": 3}),
    ("sltrain", "adamw", "fp32", {"sltrain_density": 0.2}),
    ("sltrain", "adamw8bit", "fp32", {"sltrain_density": 0.2}),
    ("sltrain", "adamw8bit", "bf16", {"sltrain_density": 0.1}),
]


@pytest.mark.parametrize("method,optim,dtype,extra", CASES)
def test_estimated_weights_states_and_counts_match_the_trainer(method: str, optim: str, dtype: str,
                                                               extra: dict) -> None:
    cfg = TrainConfig(method=method, optim=optim, dtype=dtype, extra=extra, **NANO)
    run = build_run(cfg)
    run.optimizer.step(Closure.for_run(run))  # states are created on the first step
    report = estimate_config(cfg, vocab_size=int(run.model.config.vocab_size))
    params = list(run.model.parameters())
    assert report.weights == local_bytes(params) + local_bytes(run.model.buffers())
    # the estimator's convention: frozen adapter tensors are not in the parameter count (LoRA-FA's A, DLRT's U, V;
    # here ReLoRA's adapters, which wait frozen during the warm start); frozen base weights are
    waiting = sum(p.numel() for n, p in run.model.named_parameters() if ".adapters." in n and not p.requires_grad)
    assert report.params_total == sum(p.numel() for p in params) - waiting
    assert report.params_trainable == sum(p.numel() for p in params if p.requires_grad)
    assert report.optimizer_states == pytest.approx(optimizer_state_bytes_local(run.optimizer), rel=0.01)


def test_the_sltrain_density_reaches_the_estimate() -> None:
    sparse, denser = (estimate_config(TrainConfig(method="sltrain", extra={"sltrain_density": d}, **NANO),
                                      vocab_size=500) for d in (0.05, 0.2))
    assert denser.params_total > sparse.params_total and denser.weights > sparse.weights
