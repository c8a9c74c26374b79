"""Tiny LLaMA pre-training from scratch: every available optimizer/method lowers validation loss; the task's
perplexity is exp(mean token loss); a full ``leantrain.train`` run writes its sample and metrics."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from leantrain.lm.data import BlockBatcher, Blocks
from leantrain.lm.task import CausalLMTask
from leantrain.methods import get_method
from leantrain.optim.registry import build_optimizer
from leantrain.models import enable_activation_checkpointing

STEPS = 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run faster on one thread than two fighting ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(corpus_path, tmp_path_factory, lm_config):
    cfg = lm_config(corpus_path, tmp_path_factory.mktemp("run"))
    return CausalLMTask(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def init_model(task):
    return copy.deepcopy(task.model)


CASES = [  # (method, optimizer, lr)
    ("full", "adamw", 3e-3),
    ("full", "galore-adamw", 1e-2),  # GaLore's scale 0.25 shrinks the step: the paper uses lr 0.01
    ("full", "galore-adamw8bit", 1e-2),
    ("full", "adamw8bit", 3e-3),
    ("lowrank", "adamw", 3e-3),
    ("gradnormlorp", "adamw", 3e-3),
]


@pytest.mark.parametrize("method_name, optim, lr", CASES)
def test_pretraining_lowers_validation_loss(task, init_model, method_name, optim, lr):
    model = copy.deepcopy(init_model)
    if method_name == "lowrank":
        from leantrain.lm.lowrank import LOWRANK as method
    else:
        try:
            method = get_method(method_name)
        except ValueError as exc:
            pytest.skip(str(exc))
    cfg = task.cfg
    groups = method.apply(model, cfg, None)
    try:
        opt = build_optimizer(optim, groups, cfg, lr)
    except ValueError as exc:
        pytest.skip(f"{optim} not importable yet: {exc}")
    task.model = model
    before = task.evaluate()["loss"]
    for step in range(STEPS):
        batch = task.batch(step)

        def closure(batch=batch):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(batch)
            loss.backward()
            return loss

        opt.step(closure)
    after = task.evaluate()["loss"]
    assert math.log(len(task.vocab)) - 0.5 < before  # a random init is close to uniform
    assert after < before - 0.3, (method_name, optim, before, after)


class ToyLM(torch.nn.Module):
    """Always predicts p = [1/2, 1/4, 1/8, 1/8] over a 4-token vocabulary."""

    def forward(self, input_ids):
        logp = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
        return type("Out", (), {"logits": logp.expand(*input_ids.shape, 4)})()


def test_perplexity_is_exp_mean_token_loss_by_hand(task):
    toy = copy.copy(task)
    toy.model = ToyLM()
    # targets 1, 2, 3 (p = 1/4, 1/8, 1/8) in block 0; block 1 targets 0 (masked) and 0 (p = 1/2)
    ids = torch.tensor([[0, 1, 2, 3], [3, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    toy.val_batches = BlockBatcher(Blocks(ids, mask), batch_size=1, seed=0)
    out = toy.evaluate()
    nats = [2 * math.log(2), 3 * math.log(2), 3 * math.log(2), math.log(2)]  # -log p of the 4 unmasked targets
    assert out["tokens"] == 4
    assert out["loss"] == pytest.approx(sum(nats) / 4)
    assert out["perplexity"] == pytest.approx(2 ** (9 / 4))


def test_train_run_writes_sample_and_metrics(corpus_path, tmp_path, lm_config):
    from leantrain.train import train

    cfg = lm_config(corpus_path, tmp_path / "run", steps=20, eval_every=10, extra={"eval_before": True})
    metrics = train(cfg)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_loss"] < metrics["val_loss_before"] - 0.5
    sample = (tmp_path / "run" / "sample.txt").read_text()
    assert ">>>" in sample and sample.strip() == metrics["sample"]
    info = json.loads((tmp_path / "run" / "lm.json").read_text())
    assert len(info["vocab_original_ids"]) == metrics["vocab_size"] < 40
    assert info["model_config"]["hidden_size"] == 32


def test_activation_checkpointing_gives_the_same_gradients(corpus_path, tmp_path, lm_config):
    grads = []
    for flag in (False, True):
        t = CausalLMTask(lm_config(corpus_path, tmp_path, activation_checkpointing=flag), torch.device("cpu"))
        if flag:  # the run assembly enables it for every task (run.build_run)
            enable_activation_checkpointing(t.model)
        t.model.train()
        t.loss(t.batch(0)).backward()
        assert t.model.model.gradient_checkpointing == flag
        grads.append(torch.cat([p.grad.reshape(-1) for p in t.model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
