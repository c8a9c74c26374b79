"""Estimator arithmetic against hand counts and published formulas (expected values computed here by hand)."""
from __future__ import annotations

import json
import math

import pytest

from leantrain.memory import ModelSpec, ParamSpec, estimate, from_module, model_spec, state_bytes
from leantrain.memory.activations import block_bytes_per_token
from leantrain.memory.estimate import quantized_bytes


def one_linear(out_f: int = 64, in_f: int = 96, head: bool = False) -> ModelSpec:
    mod = "classifier" if head else "lin"
    return ModelSpec("one", [ParamSpec(f"{mod}.weight", (out_f, in_f), mod, "linear"),
                             ParamSpec(f"{mod}.bias", (out_f,), mod, "bias")],
                     hidden=out_f, layers=1, heads=1, intermediate=out_f)


def test_analytic_bert_layout_matches_the_real_tiny_classifier() -> None:
    from leantrain.models import build_classifier

    model = build_classifier("tiny", 3)
    real = from_module(model)
    ours = model_spec("tiny", num_labels=3)
    assert sorted((p.name, p.shape, p.kind) for p in ours.params) == sorted((p.name, p.shape, p.kind) for p in real.params)
    assert sum(n * b for n, b in ours.buffers.values()) == sum(n * b for n, b in real.buffers.values())


def test_analytic_llama_layout_matches_transformers_on_meta() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4,
               "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000, "tie_word_embeddings": False}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    real = from_module(model)
    from leantrain.memory import from_hf_config

    ours = from_hf_config(cfg)
    assert sorted((p.name, p.shape) for p in ours.params) == sorted((p.name, p.shape) for p in real.params)
    assert ours.num_params == sum(p.numel() for p in model.parameters())


def test_state_bytes_of_quantized_codecs() -> None:
    # 8-bit: 1 B/element + one fp32 absmax per 256-block; < 4096 elements stay fp32 (bitsandbytes min_8bit_size).
    assert state_bytes(4096, 2, "8bit", 2) == 2 * (4096 + 16 * 4)
    assert state_bytes(4095, 2, "8bit", 2) == 2 * 4095 * 4
    assert state_bytes(10_000, 1, "8bit", 4) == 10_000 + 40 * 4  # ceil(10000/256) = 40 blocks
    assert state_bytes(10_001, 2, "4bit", 4) == 2 * (5001 + 40 * 4)
    assert state_bytes(1000, 2, "native", 2) == 4000
    # ≈ 2.03 B/param for 8-bit Adam (spec §3)
    assert state_bytes(2**20, 2, "8bit", 4) / 2**20 == pytest.approx(2.03125)


def test_nf4_and_int8_base_bytes() -> None:
    n = 4096 * 4096
    blocks = n // 64
    nf4 = n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 + 64
    assert quantized_bytes(n, 4096, "nf4") == nf4
    assert nf4 / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-4)  # QLoRA: ~4.127 bits per parameter
    assert quantized_bytes(n, 4096, "int8") == n + 4 * 4096


def test_lora_on_a_quantized_base() -> None:
    spec = one_linear(64, 128)
    r = estimate(spec, "lora", "adamw", "fp32", rank=4, quantize="nf4")
    base = quantized_bytes(64 * 128, 64, "nf4") + 64 * 4  # quantized W + fp32 bias
    assert r.weights == base + (4 * 128 + 64 * 4) * 4
    assert r.gradients == (4 * 128 + 64 * 4) * 4


def test_korthikanti_activation_formula() -> None:
    # Korthikanti et al. 2022: per layer s·b·h·(34 + 5·a·s/h) bytes at 16-bit with dropout and f = 4h.
    spec = ModelSpec("gpt", [], family="bert", hidden=1024, layers=1, heads=16, intermediate=4096, dropout=True)
    s = 2048
    assert block_bytes_per_token(spec, s, 2) == 1024 * 34 + 5 * 16 * s
    # CUDA keeps 1-byte dropout masks (the paper's setting); on CPU at::dropout saves a noise tensor of e bytes.
    spec = ModelSpec("x", one_linear(1024, 1024).params, family="bert", hidden=1024, layers=3, heads=16,
                     intermediate=4096, dropout=True)
    r = estimate(spec, "full", dtype="bf16", batch_size=2, seq_len=s, device="cuda")
    assert r.details["activations.blocks"] == 3 * 2 * s * (1024 * 34 + 5 * 16 * s)
    ck = estimate(spec, "full", dtype="bf16", batch_size=2, seq_len=s, activation_checkpointing=True, device="cuda")
    assert ck.details["activations.blocks"] == 3 * 2 * s * 2 * 1024 + 2 * s * (1024 * 34 + 5 * 16 * s)
    cpu = estimate(spec, "full", dtype="bf16", batch_size=2, seq_len=s, device="cpu")
    assert cpu.details["activations.blocks"] == 3 * 2 * s * (1024 * 34 + 2 * 1024 + 6 * 16 * s)


def test_adapter_parameter_counts() -> None:
    out_f, in_f, r = 64, 96, 4
    spec = one_linear(out_f, in_f)
    bias = out_f  # the head-less one-Linear model: nothing else trains
    assert estimate(spec, "lora", rank=r).params_trainable == r * (out_f + in_f)
    assert estimate(spec, "dora", rank=r).params_trainable == r * (out_f + in_f) + out_f
    assert estimate(spec, "vera", rank=r).params_trainable == r + out_f
    assert estimate(spec, "miss", rank=r).params_trainable == r * out_f
    assert estimate(spec, "shira", rank=r).params_trainable == r * (out_f + in_f)
    assert estimate(spec, "shira", rank=r, fraction=0.01).params_trainable == int(0.01 * out_f * in_f)
    assert estimate(spec, "full").params_trainable == out_f * in_f + bias
    # DLRT (leantrain's KLS): K (n×r), L (m×r) and S (r×r) have gradients/optimizer state, plus the bias;
    # the stored layer is U (n×r), V (m×r) buffers + S: r(n+m) + r² (+bias) instead of n·m.
    dl = estimate(spec, "dlrt", rank=r)
    assert dl.params_trainable == out_f * r + in_f * r + r * r + bias
    assert dl.weights == (r * (out_f + in_f) + r * r + bias) * 4
    assert estimate(spec, "dlrt", rank=r, dlrt_ranks={"lin": 2}).weights == (2 * (out_f + in_f) + 4 + bias) * 4
    # The task head always trains and is never adapted.
    head = estimate(one_linear(3, 96, head=True), "head")
    assert head.params_trainable == 3 * 96 + 3


def test_galore_8bit_states_use_lowrank_size() -> None:
    m, n, r = 256, 1024, 32  # low-rank moments (n×r... = max(m,n)·r = 32768 elements) ≥ 4096 -> 8-bit
    spec = one_linear(m, n)
    rep = estimate(spec, "galore-8bit", dtype="bf16", rank=r, bf16_update="plain")  # bf16 projector
    lowrank = n * r
    bias_states = 2 * m * 4  # bias (256 elements) keeps fp32 states
    assert rep.optimizer_states == 2 * (lowrank + lowrank // 256 * 4) + m * r * 2 + bias_states + 2 * 4
    # the compensated bf16 update steps fp32 copies, so its projector is fp32 (4 bytes)
    stochastic = estimate(spec, "galore-8bit", dtype="bf16", rank=r)
    assert stochastic.optimizer_states - rep.optimizer_states == m * r * 2


def test_gradnormlorp_states_match_spec_check_4() -> None:
    # Spec B.3 check 4: states = 2·m·r (moments) + r·n (projector) + 2·m (Adam on g), m ≥ n, right projection.
    m, n, r = 128, 64, 8
    rep = estimate(one_linear(m, n), "gradnormlorp", "adamw", "fp32", rank=r)
    bias = 2 * m * 4
    assert rep.optimizer_states == (2 * m * r + r * n + 2 * m) * 4 + bias + 3 * 4


def test_checkpointing_and_layerwise_reduce_memory() -> None:
    a = estimate("llama-1b", "galore", dtype="bf16", rank=512, batch_size=8, seq_len=256)
    b = estimate("llama-1b", "galore", dtype="bf16", rank=512, batch_size=8, seq_len=256,
                 activation_checkpointing=True, layerwise=True)
    assert b.activations < a.activations / 5 and b.gradients < a.gradients / 10
    assert b.weights == a.weights and b.optimizer_states == a.optimizer_states


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"optim": "adamw7bit"}, "unknown optimizer 'adamw7bit'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"method": "full", "quantize": "nf4"}, "needs a frozen base"),
    ({"method": "lora", "quantize": "nf3"}, "quantize='nf3'"),
    ({"method": "shira", "rank": 1000}, "lower the rank"),
    ({"method": "lora", "targets": "nonexistent"}, "selects no Linear"),
    ({"batch_size": 0}, "batch_size=0"),
])
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        estimate(one_linear(), **kwargs)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'llama-2b'"):
        model_spec("llama-2b")


def test_cli_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    from leantrain.commands.memory import main

    assert main(["--model", "llama-60m", "--method", "galore", "--rank", "128", "--dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("weights", "gradients", "optimizer_states", "activations", "total"):
        assert isinstance(out[key], int) and out[key] >= 0
    assert out["weights"] == 58_073_600 * 2 + 2 * 32 * 4  # bf16 parameters + two fp32 rotary buffers
    # peak = resident + max(backward start: all activations + head grads, step: all grads + workspace)
    assert out["total"] == out["weights"] + out["optimizer_states"] + max(
        out["activations"] + out["backward_start_gradients"], out["gradients"] + out["optimizer_workspace"])
    assert out["backward_start_gradients"] == 32000 * 512 * 2  # lm_head gradient, computed first in backward
    assert main(["--model", "llama-7b", "--method", "full", "--dtype", "bf16"]) == 0
    assert "GiB" in capsys.readouterr().out
    assert main(["--model", "llama-60m", "--method", "full", "--quantize", "nf4"]) == 2
    assert "needs a frozen base" in capsys.readouterr().err


def test_estimate_config_maps_trainconfig_fields() -> None:
    from leantrain.config import TrainConfig
    from leantrain.memory import estimate_config

    cfg = TrainConfig(model="tiny", method="lora", optim="adamw8bit", rank=4, batch_size=3, max_length=20)
    a = estimate_config(cfg)
    b = estimate("tiny", method="lora", optim="adamw8bit", rank=4, batch_size=3, seq_len=20)
    assert a.as_dict() == b.as_dict()
    assert estimate_config(cfg, batch_size=6).activations > a.activations


def test_other_architectures_are_built_on_meta() -> None:
    from leantrain.memory import from_hf_config

    cfg = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 500, "n_positions": 128,
           "architectures": ["GPT2LMHeadModel"]}
    spec = from_hf_config(cfg, "gpt2-tiny")
    # Hand count: wte 500·64 + wpe 128·64 + 2 × (2 LN (2·64 each) + c_attn 64·192+192 + c_proj 64·64+64
    #             + c_fc 64·256+256 + c_proj 256·64+64) + ln_f 2·64   (GPT2Model: no LM head)
    per_layer = 4 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert spec.num_params == 500 * 64 + 128 * 64 + 2 * per_layer + 2 * 64
    assert (spec.hidden, spec.layers, spec.heads) == (64, 2, 4)
    assert estimate(spec, "full", batch_size=2, seq_len=16).total > 0


@pytest.mark.parametrize("old,new", [
    (("galore", "adamw"), ("full", "galore-adamw")),
    (("galore", "adamw8bit"), ("full", "galore-adamw8bit")),
    (("galore-8bit", "adamw"), ("full", "galore-adamw8bit")),
    (("galore-8bit", "galore-adamw4bit"), ("full", "galore-adamw4bit")),
    (("lora", "adamw"), ("lora", "adamw")),
])
def test_old_galore_method_names_are_aliases_of_trains_spelling(old, new) -> None:
    from leantrain.memory import resolve_method_alias

    assert resolve_method_alias(*old) == new
    kw = {"dtype": "bf16", "rank": 128, "seq_len": 8}
    a = estimate("llama-60m", method=old[0], optim=old[1], **kw).as_dict()
    assert a == estimate("llama-60m", method=new[0], optim=new[1], **kw).as_dict()
    assert (a["setting"]["method"], a["setting"]["optim"]) == new


def test_layerwise_steps_inside_backward_so_the_workspace_meets_the_activations() -> None:
    """--layerwise steps the head while nearly all activations are alive: its step workspace is counted at the
    backward start; the ordinary step runs after backward, when the activations are gone."""
    kwargs = {"method": "full", "optim": "adamw8bit", "dtype": "bf16", "batch_size": 1, "seq_len": 256}
    ordinary, layerwise = estimate("llama-60m", **kwargs), estimate("llama-60m", layerwise=True, **kwargs)
    assert layerwise.step_in_backward and not ordinary.step_in_backward
    resident = layerwise.weights + layerwise.optimizer_states
    assert layerwise.total >= resident + layerwise.activations + layerwise.optimizer_workspace
    assert ordinary.total == ordinary.weights + ordinary.optimizer_states + max(
        ordinary.activations + ordinary.backward_start_gradients, ordinary.gradients + ordinary.optimizer_workspace)
