"""Every registered optimizer declares a default-lr scale (``OptimizerSpec.lr_scale``), and a run without --lr
trains at the method's (or pre-training's) lr times that scale, records it in config.json and builds the optimizer
with it."""
from __future__ import annotations

import json

import pytest

from leantrain.config import SCRATCH_LR, TrainConfig
from leantrain.methods import get_method
from leantrain.optim.registry import available_optimizers, get_spec
from leantrain.optim.spec import TASKS, OptimizerSpec
from leantrain.run import build_run

NAMES = available_optimizers()
NANO = {"task": "causal-lm", "init_weights": "scratch", "preset": "nano", "method": "full", "train_size": 8,
        "val_size": 4, "batch_size": 2, "max_length": 16, "progress": False}


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_declares_a_positive_scale_per_task(name):
    spec = get_spec(name)
    for task in TASKS:
        assert spec.lr_scale_for(task) > 0


@pytest.mark.parametrize("name", NAMES)
def test_config_without_lr_uses_the_scaled_default_and_records_it(name):
    spec = get_spec(name)
    lora = TrainConfig(optim=name)  # the main job: LoRA on the classifier
    assert lora.lr == pytest.approx(get_method("lora").default_lr * spec.lr_scale_for("classify"))
    scratch = TrainConfig(optim=name, task="causal-lm", init_weights="scratch")
    assert scratch.lr == pytest.approx(SCRATCH_LR * spec.lr_scale_for("causal-lm"))
    assert json.loads(scratch.to_json())["lr"] == scratch.lr  # config.json holds what ran
    assert TrainConfig(optim=name, lr=0.123).lr == 0.123  # --lr always wins


@pytest.mark.parametrize("name", [n for n in NAMES if get_spec(n).lr_scale_for("causal-lm") != 1.0] or ["adamw"])
def test_the_run_builds_the_optimizer_at_the_scaled_lr(name):
    cfg = TrainConfig(optim=name, **NANO)
    run = build_run(cfg)
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([cfg.lr] * len(run.optimizer.param_groups))
    assert cfg.lr == pytest.approx(SCRATCH_LR * get_spec(name).lr_scale_for("causal-lm"))


@pytest.mark.parametrize("scale", [0.0, -1.0, {"classify": 0.0}, {"regression": 2.0}, "2"])
def test_bad_scale_is_refused_in_one_line_naming_the_spec(scale):
    with pytest.raises(ValueError, match=r"optimizer spec 'x': lr_scale\[.*must be a positive number"):
        OptimizerSpec("x", lambda g, o, lr: None, 2, "native", "x", lr_scale=scale)


def test_a_task_left_out_of_the_mapping_gets_adamws_lr():
    spec = OptimizerSpec("x", lambda g, o, lr: None, 2, "native", "x", lr_scale={"causal-lm": 3.0})
    assert (spec.lr_scale_for("causal-lm"), spec.lr_scale_for("classify")) == (3.0, 1.0)
