"""Every registered method and every registered optimizer trains, checkpoints and resumes exactly.

Table-driven over ``leantrain.methods.available_methods()`` and ``leantrain.optim.available_optimizers()``: a new
registry entry is exercised here without a new test. Each case runs ``leantrain train`` on the tiny random BERT
twice -- straight through 4 steps, and stopped after 2 then ``--resume``d -- and requires bit-identical per-step
losses and final trainable tensors (CPU), which covers the method's trainable state, the optimizer's state
(quantized codes, projector bases) and the RNG in the checkpoint.
"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from leantrain.cli import main
from leantrain.methods import specs
from leantrain.optim import available_optimizers
from leantrain.report import read_jsonl

# Methods declaring another task only (the LM low-rank baseline) are covered by tests/lm.
CLASSIFY_METHODS = sorted(name for name, method in specs().items() if "classify" in method.tasks)


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _straight_and_resumed(tmp_path, args: list[str]) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*args, "--steps", "4", "--save-every", "2", "--dropout", "0.0", "--model-dropout", "0.0"]
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--out", str(split), "--stop-at", "2"]) == 0
    assert not (split / "metrics.json").exists()
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0
    assert _losses(split) == _losses(straight) and len(_losses(straight)) == 4
    a, b = load_file(straight / "trainable.safetensors"), load_file(split / "trainable.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("method", CLASSIFY_METHODS)
def test_every_method_trains_and_resumes_exactly(method, tmp_path, tiny_args):
    """Each method with an 8-bit optimizer (quantized state in the checkpoint)."""
    _straight_and_resumed(tmp_path, [*tiny_args, "--method", method, "--optim", "adamw8bit", "--rank", "4"])


@pytest.mark.parametrize("optim", available_optimizers())
def test_every_optimizer_trains_and_resumes_exactly(optim, tmp_path, tiny_args):
    """Each optimizer on full fine-tuning (so GaLore projects the 2-D weights at rank 4)."""
    _straight_and_resumed(tmp_path, [*tiny_args, "--method", "full", "--optim", optim, "--rank", "4",
                                     "--lr", "1e-3"])


@pytest.mark.parametrize("method", CLASSIFY_METHODS)
def test_apply_returns_exactly_the_parameters_that_train(method):
    """A method's param groups hold every parameter that requires grad outside the head, each once, and nothing
    frozen (a frozen tensor in a group wastes optimizer state; a trainable one outside the groups never moves)."""
    from leantrain.config import TrainConfig
    from leantrain.methods import get_method, head_parameter_names
    from leantrain.models import build_classifier

    model = build_classifier("tiny", num_labels=3, seed=0)
    groups = get_method(method).apply(model, TrainConfig(model="tiny", method=method, rank=4), None)
    grouped = [p for g in groups for p in g["params"]]
    head = head_parameter_names(model)
    wanted = [p for n, p in model.named_parameters() if p.requires_grad and n not in head]
    assert len({id(p) for p in grouped}) == len(grouped), "a parameter sits in two groups"
    assert {id(p) for p in grouped} == {id(p) for p in wanted}
    assert all(p.requires_grad for p in grouped)
