"""--master-weights fp32 (leantrain/mixed.py): fp32 weights and optimizer, autocast compute, fp16 loss scaling."""
from __future__ import annotations

import json

import pytest
import torch

from leantrain.config import TrainConfig
from leantrain.loop import Closure
from leantrain.run import build_run
from leantrain.train import train

TINY = {"model": "tiny", "train_size": 64, "val_size": 16, "max_length": 32, "batch_size": 8, "method": "full",
        "progress": False, "overwrite": True, "model_dropout": 0.0}


def _losses(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_weights_and_state_stay_fp32_while_matmuls_run_in_the_dtype(dtype: str) -> None:
    run = build_run(TrainConfig(dtype=dtype, master_weights="fp32", **TINY))
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    seen: list[torch.dtype] = []
    linear = next(m for m in run.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    loss = run.task.loss(run.task.batch(0))
    assert seen == [{"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]]
    assert loss.dtype == torch.float32
    run.optimizer.step(Closure.for_run(run))
    states = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_mixed_bf16_tracks_fp32_closely(tmp_path) -> None:
    train(TrainConfig(out=str(tmp_path / "fp32"), steps=6, **TINY))
    train(TrainConfig(out=str(tmp_path / "mixed"), steps=6, dtype="bf16", master_weights="fp32", **TINY))
    fp32, mixed = _losses(tmp_path / "fp32"), _losses(tmp_path / "mixed")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(fp32, mixed)]
    assert 0 < max(diffs) < 2e-2  # autocast changes the numbers (bf16 matmuls) but not the trajectory


def test_fp16_overflow_skips_the_update_and_backs_off() -> None:
    run = build_run(TrainConfig(dtype="fp16", master_weights="fp32", **TINY))
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # fp16's max is 65504: the backward overflows
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    closure = Closure.for_run(run)
    loss = run.optimizer.step(closure)
    assert closure.overflowed and torch.isfinite(loss)
    for n, p in run.model.named_parameters():
        assert torch.equal(p, before[n]), n
    run.scaler.update()
    assert run.scaler.get_scale() == 2.0**119


def test_fp16_counts_overflows_and_resumes_exactly(tmp_path) -> None:
    opts = dict(TINY, steps=6, dtype="fp16", master_weights="fp32", save_every=3)
    metrics = train(TrainConfig(out=str(tmp_path / "whole"), **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), stop_at=3, **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), resume=True, **{k: v for k, v in opts.items() if k != "overwrite"}))
    whole, parts = _losses(tmp_path / "whole"), _losses(tmp_path / "parts")
    assert [r["loss"] for r in whole] == [r["loss"] for r in parts]
    assert [r["loss_scale"] for r in whole] == [r["loss_scale"] for r in parts]
    assert metrics["skipped_steps"] == sum(r["overflow"] for r in whole)


@pytest.mark.parametrize("opts,match", [
    ({"master_weights": "fp32"}, "needs a low --dtype"),
    ({"master_weights": "fp64", "dtype": "bf16"}, "must be fp32 or None"),
    ({"dtype": "fp16"}, "add --master-weights fp32"),
    ({"dtype": "fp16", "master_weights": "fp32", "layerwise": True}, "cannot run --layerwise"),
])
def test_refused_combinations_name_the_option(opts: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, **opts})
