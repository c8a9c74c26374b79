"""Issue 19 item 3: --activation-checkpointing for every task (encoders included): the same losses and gradients,
less activation memory."""
from __future__ import annotations

import pytest
import torch

from leantrain.config import TrainConfig
from leantrain.memory.measuring import measure
from leantrain.run import build_run

TASKS = {
    "classify": {"model": "tiny", "max_length": 64, "model_dropout": 0.0},
    "causal-lm": {"task": "causal-lm", "init_weights": "scratch", "preset": "nano", "max_length": 128},
}


def _run(task: str, checkpointing: bool):
    cfg = TrainConfig(method="full", train_size=32, val_size=8, batch_size=8, progress=False,
                      activation_checkpointing=checkpointing, **TASKS[task])
    return build_run(cfg)


def _step(run) -> tuple[float, dict[str, torch.Tensor]]:
    run.optimizer.zero_grad(set_to_none=True)
    loss = run.task.loss(run.task.batch(0))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_checkpointing_keeps_loss_and_gradients(task: str) -> None:
    plain, ckpt = _run(task, False), _run(task, True)
    (loss_a, grads_a), (loss_b, grads_b) = _step(plain), _step(ckpt)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_checkpointing_lowers_the_step_peak(task: str) -> None:
    peaks = {}
    for flag in (False, True):
        run = _run(task, flag)

        def step() -> None:
            run.optimizer.zero_grad(set_to_none=True)
            run.task.loss(run.task.batch(0)).backward()

        peaks[flag] = measure(step, run.model).peak
    assert peaks[True] < peaks[False], peaks
