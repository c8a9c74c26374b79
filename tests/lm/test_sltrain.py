"""SLTrain (``--method sltrain``, Han et al. 2024): W = s B A + S with a fixed random support of density delta;
only B, A and the sparse values train (with the non-targeted parameters, as in pre-training)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from leantrain.lm.sltrain import (
    SLTRAIN,
    SparseLowRankLinear,
    dense_weight,
    density_of,
    support_size,
)
from leantrain.report import read_jsonl


def _layer(density: float = 0.1, seed: int = 0) -> SparseLowRankLinear:
    torch.manual_seed(seed)
    return SparseLowRankLinear(nn.Linear(40, 30), rank=4, alpha=8.0, density=density,
                               generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("density", [0.03, 0.1, 0.5])
def test_support_has_the_configured_density_without_repeats(density):
    layer = _layer(density)
    assert layer.support.numel() == layer.values.numel() == support_size(30, 40, density) == int(density * 1200)
    assert torch.equal(layer.support, layer.support.unique())  # sorted, distinct
    assert 0 <= int(layer.support.min()) and int(layer.support.max()) < 1200


def test_weight_starts_as_the_sparse_part_and_gradients_match_dense_autograd():
    layer = _layer()
    w = layer.weight_dense()
    assert int((w != 0).sum()) <= layer.values.numel()  # B = 0: W = S at init
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(3, 5, 40)
    layer(x).pow(2).sum().backward()
    grads = [t.grad.clone() for t in (layer.B, layer.A, layer.values, layer.bias)]
    ref = [t.detach().clone().requires_grad_(True) for t in (layer.B, layer.A, layer.values, layer.bias)]
    y = nn.functional.linear(x, dense_weight(ref[0], ref[1], ref[2], layer.support, layer.scale), ref[3])
    y.pow(2).sum().backward()
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want.grad, rtol=1e-4, atol=1e-5)


def test_support_is_fixed_and_only_b_a_and_values_train():
    layer = _layer()
    support = layer.support.clone()
    assert {n for n, _ in layer.named_parameters()} == {"B", "A", "values", "bias"}
    assert [n for n, _ in layer.named_buffers()] == ["support"]
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    before = layer.weight_dense().detach().clone()
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 40)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.support, support)
    changed = (layer.weight_dense() - before).abs() > 0
    assert changed.any()


def test_same_seed_same_support_and_density_option_is_checked():
    assert torch.equal(_layer(seed=1).support, _layer(seed=1).support)
    assert not torch.equal(_layer(seed=1).support, _layer(seed=2).support)
    assert density_of({}) == 0.03
    with pytest.raises(ValueError, match="sltrain_density=1.5"):
        density_of({"sltrain_density": 1.5})


def test_apply_replaces_the_linears_and_groups_what_trains(corpus_path, tmp_path, lm_config):
    from leantrain.lm.task import CausalLMTask

    cfg = lm_config(corpus_path, tmp_path, method="sltrain", rank=4, extra={"sltrain_density": 0.05})
    model = CausalLMTask(cfg, torch.device("cpu")).model
    dense = sum(p.numel() for p in model.parameters())
    groups = SLTRAIN.apply(model, cfg)
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    assert layers and not any(isinstance(m, nn.Linear) and min(m.weight.shape) > 4 and m is not
                              model.get_output_embeddings() for m in model.modules())
    factors = {id(p) for g in groups if g["name"] == "sltrain" for p in g["params"]}
    assert factors == {id(p) for m in layers for p in (m.B, m.A, m.values)}
    assert sum(p.numel() for p in model.parameters()) < dense


def test_pretraining_run_resumes_bit_exactly(corpus_path, tmp_path, lm_config):
    from leantrain.train import train

    common = {"method": "sltrain", "rank": 4, "steps": 4, "save_every": 2, "extra": {"sltrain_density": 0.05}}
    straight = train(lm_config(corpus_path, tmp_path / "a", **common))
    train(lm_config(corpus_path, tmp_path / "b", stop_at=2, **common))
    resumed = train(lm_config(corpus_path, tmp_path / "b", resume=True, overwrite=False, **common))
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert resumed["val_loss"] == straight["val_loss"]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["extra"] == {"sltrain_density": 0.05}


def test_layerwise_equals_the_ordinary_step_and_bf16_trains(corpus_path, tmp_path, lm_config):
    """--layerwise steps B, A and the values inside backward exactly as the ordinary step does (the hand-written
    backward accumulates each gradient once); --dtype bf16 keeps every factor in bf16 and finite."""
    from leantrain.train import train

    common = {"method": "sltrain", "rank": 4, "steps": 4, "grad_clip": None, "extra": {"sltrain_density": 0.05}}
    train(lm_config(corpus_path, tmp_path / "ordinary", **common))
    train(lm_config(corpus_path, tmp_path / "layerwise", layerwise=True, **common))
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]
              for d in ("ordinary", "layerwise")]
    assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses)) <= 1e-6
    metrics = train(lm_config(corpus_path, tmp_path / "bf16", dtype="bf16", **common))
    from safetensors.torch import load_file

    state = load_file(tmp_path / "bf16" / "trainable.safetensors")
    values = [v for k, v in state.items() if k.endswith((".A", ".B", ".values"))]
    assert values and all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in values)
    assert math.isfinite(metrics["val_loss"])


def test_memory_efficient_version_8bit_states_layerwise_bf16(corpus_path, tmp_path, lm_config):
    """The paper's memory-efficient SLTrain (its LLaMA-7B run: bitsandbytes Adam8bit, per-layer updates, bf16):
    --optim adamw8bit with --layerwise gives the ordinary 8-bit step's losses exactly (the 8-bit blocks never span
    two parameters); with --dtype bf16 as well the factors stay bf16 and the state is smaller than fp32 Adam's (its
    exact bytes, 8-bit codes + absmax for tensors of >= 4096 entries, fp32 below: test_estimator_vs_trainer_methods)."""
    from safetensors.torch import load_file

    from leantrain.train import train

    common = {"method": "sltrain", "rank": 4, "steps": 4, "grad_clip": None, "optim": "adamw8bit",
              "preset": "small", "extra": {"sltrain_density": 0.05}}
    train(lm_config(corpus_path, tmp_path / "ordinary", **common))
    train(lm_config(corpus_path, tmp_path / "layerwise", layerwise=True, **common))
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]
              for d in ("ordinary", "layerwise")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    fp32 = train(lm_config(corpus_path, tmp_path / "fp32", **{**common, "optim": "adamw", "dtype": "bf16"}))
    q = train(lm_config(corpus_path, tmp_path / "q", layerwise=True, dtype="bf16", **common))
    assert math.isfinite(q["val_loss"]) and q["optimizer_state_bytes"] < fp32["optimizer_state_bytes"]
    state = load_file(tmp_path / "q" / "trainable.safetensors")
    factors = [v for k, v in state.items() if k.endswith((".A", ".B", ".values"))]
    assert factors and all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in factors)
