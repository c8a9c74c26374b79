"""ReLoRA (``--method relora``, Lialin et al. 2023): merge + re-init + pruned state every N steps, jagged lr,
exact resume across a restart."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from leantrain.adapters import inject
from leantrain.adapters.lora import LoraConfig
from leantrain.adapters.relora import (
    ReloraOptimizer,
    ReloraOptions,
    merge_and_reinit,
    prune_state,
    restart_generator,
    warmup_scale,
)
from leantrain.cli import main
from leantrain.report import read_jsonl


def _lora_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))
    inject(model, LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()  # a trained adapter: B != 0
    return model


def test_options_are_read_from_extra_and_checked():
    assert ReloraOptions.of({}) == ReloraOptions(200, 20, 0.99)
    assert ReloraOptions.of({"relora_every": 10}) == ReloraOptions(10, 1, 0.99)
    for extra, needle in [({"relora_every": 0}, "relora_every=0"), ({"relora_every": 4, "relora_warmup": 4},
                          "relora_warmup=4"), ({"relora_prune": 1.5}, "relora_prune=1.5")]:
        with pytest.raises(ValueError, match=needle):
            ReloraOptions.of(extra)


def test_merge_keeps_the_function_and_reinitialises_the_adapters():
    model = _lora_model()
    x = torch.randn(5, 12)
    before = model(x)
    gen = restart_generator(0, 1)
    weights = {i: model.get_submodule(i).base_layer.weight.detach().clone() for i in ("0", "2")}
    for i in ("0", "2"):
        merge_and_reinit(model.get_submodule(i), gen)
    assert torch.allclose(model(x), before, atol=1e-5)
    for i in ("0", "2"):
        layer = model.get_submodule(i)
        p = layer.adapters["default"]
        assert torch.equal(p.lora_B, torch.zeros_like(p.lora_B))
        assert p.lora_A.abs().max() <= 1 / p.lora_A.shape[1] ** 0.5 and p.lora_A.abs().sum() > 0
        assert not torch.equal(layer.base_layer.weight, weights[i])


def test_restart_draws_do_not_touch_the_global_rng():
    layer = _lora_model().get_submodule("0")
    state = torch.get_rng_state()
    merge_and_reinit(layer, restart_generator(0, 1))
    assert torch.equal(torch.get_rng_state(), state)


def _adam_state(model: nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
    return opt


def test_pruning_keeps_the_largest_moments_with_one_mask():
    model = _lora_model()
    opt = _adam_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    prune_state(opt, params, 0.9)
    for p in params:
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        kept = (v != 0).sum().item()
        assert kept == round(0.1 * p.numel())
        assert torch.equal(m != 0, (m != 0) & (v != 0)), "a kept first moment met a zeroed second moment"
        assert opt.state[p]["step"].item() == 3  # the step counter is not a moment


def test_state_that_is_not_per_element_floats_is_reset():
    p = nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"codes": torch.zeros(4, 4, dtype=torch.uint8), "absmax": torch.ones(1)}
    prune_state(opt, [p], 0.99)
    assert p not in opt.state


def test_wrapper_restarts_every_n_steps_with_a_jagged_lr():
    model = _lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opts = ReloraOptions(every=2, warmup=1, prune=0.99)
    opt = ReloraOptimizer(torch.optim.AdamW(params, lr=1.0), model, opts, seed=0)
    lrs, b_zero = [], []
    for _ in range(5):
        opt.param_groups[0]["lr"] = 1.0  # the loop sets each step's lr from the step
        opt.zero_grad()
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        b_zero.append(bool((model.get_submodule("0").adapters["default"].lora_B == 0).all()))
    assert lrs == [1.0, 1.0, 0.5, 1.0, 0.5]
    assert b_zero == [False, True, False, True, False]
    assert [warmup_scale(s, opts) for s in range(5)] == lrs
    state = opt.state_dict()
    assert state["relora_steps"] == 5
    other = ReloraOptimizer(torch.optim.AdamW(params, lr=1.0), model, opts, seed=0)
    other.load_state_dict(state)
    assert other.steps == 5


def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_cli_resume_across_a_restart_is_bit_identical(tmp_path, tiny_args):
    """Restarts after steps 2 and 4; the split run stops at 3 (between them) and resumes."""
    config = tmp_path / "relora.json"
    config.write_text(json.dumps({"extra": {"relora_every": 2, "relora_warmup": 1, "relora_prune": 0.9}}))
    common = [*tiny_args, "--config", str(config), "--method", "relora", "--rank", "4", "--steps", "5",
              "--save-every", "1", "--dropout", "0.0", "--model-dropout", "0.0", "--lr", "1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--out", str(split), "--stop-at", "3"]) == 0
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0
    assert _losses(split) == _losses(straight) and len(_losses(straight)) == 5
    a, b = load_file(straight / "trainable.safetensors"), load_file(split / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("base_layer.weight") for k in a), "the merged base weights are checkpointed"
    lrs = [r["lr"] for r in read_jsonl(straight / "metrics.jsonl") if "lr" in r]
    assert lrs[2] < lrs[1] and lrs[4] < lrs[3], f"no warm-up after the restarts: {lrs}"


def test_cli_refuses_a_bad_restart_period(tmp_path, tiny_args, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"extra": {"relora_every": -1}}))
    args = [*tiny_args, "--config", str(config), "--method", "relora", "--steps", "1", "--out", str(tmp_path / "x")]
    assert main(["train", *args]) != 0
    err = capsys.readouterr().err
    assert "relora_every=-1" in err and len(err.strip().splitlines()) == 1
