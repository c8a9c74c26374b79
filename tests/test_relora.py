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
    assert ReloraOptions.of({}) == ReloraOptions(200, 20, 0.99, 0)
    assert ReloraOptions.of({"relora_every": 10}) == ReloraOptions(10, 1, 0.99)
    assert ReloraOptions.of({"relora_warm_start": 7}).warm_start == 7
    for extra, needle in [({"relora_every": 0}, "relora_every=0"), ({"relora_every": 4, "relora_warmup": 4},
                          "relora_warmup=4"), ({"relora_prune": 1.5}, "relora_prune=1.5"),
                          ({"relora_warm_start": -1}, "relora_warm_start=-1"),
                          ({"relora_warm_start": 2.5}, "relora_warm_start=2.5")]:
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


def _run_wrapper(model: nn.Module, opt: ReloraOptimizer, steps: int) -> list[dict]:
    """Take ``steps`` steps at lr 1.0 (as the loop: lr set from the step first); per step, what changed."""
    seen = []
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 1e-2
        opt.zero_grad()
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        seen.append({"changed": changed, "lr": opt.param_groups[0]["lr"] / 1e-2})
    return seen


def test_warm_start_trains_w_full_rank_then_switches_to_relora_at_n():
    """Steps 1-3 move the targeted W (adapters frozen, B = 0); after step 3 W freeze and lose their optimizer state,
    the adapters train with a re-warmed lr, and the first merge comes relora_every = 2 steps after the switch."""
    model = _lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()  # a fresh adapter, as --method relora injects it
    weights = [model.get_submodule(i).base_layer.weight for i in ("0", "2")]
    adapters = [p for n, p in model.named_parameters() if ".adapters." in n]
    opt = ReloraOptimizer(torch.optim.AdamW([{"params": adapters}, {"params": weights}], lr=1e-2), model,
                          ReloraOptions(every=2, warmup=1, prune=0.5, warm_start=3), seed=0)
    assert all(p.requires_grad for p in weights) and not any(p.requires_grad for p in adapters)
    seen = _run_wrapper(model, opt, 3)
    for row in seen:
        assert {"0.base_layer.weight", "2.base_layer.weight"} <= row["changed"]
        assert not any(".adapters." in n for n in row["changed"])
    assert not any(p.requires_grad for p in weights) and all(p.requires_grad for p in adapters)
    assert not any(p in opt.state for p in weights), "W's optimizer state is dropped at the switch"
    frozen = [w.detach().clone() for w in weights]
    seen = _run_wrapper(model, opt, 4)  # steps 4..7: warm-up at 4 (after the switch) and 6 (after the merge at 5)
    assert [row["lr"] for row in seen] == [0.5, 1.0, 0.5, 1.0]
    assert all("0.adapters.default.lora_B" in row["changed"] for row in seen)
    assert not torch.equal(weights[0], frozen[0])  # merged after step 5
    assert [warmup_scale(s, opt.opts) for s in range(8)] == [1.0, 1.0, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5]


def test_warm_start_phase_is_restored_from_the_step_counter():
    model = _lora_model()
    adapters = [p for n, p in model.named_parameters() if ".adapters." in n]
    weights = [model.get_submodule(i).base_layer.weight for i in ("0", "2")]
    opts = ReloraOptions(every=2, warmup=1, warm_start=3)
    opt = ReloraOptimizer(torch.optim.AdamW([{"params": adapters}, {"params": weights}], lr=1e-2), model, opts, 0)
    opt.load_state_dict({"inner": opt.inner.state_dict(), "relora_steps": 3})
    assert not any(p.requires_grad for p in weights) and all(p.requires_grad for p in adapters)
    opt.load_state_dict({"inner": opt.inner.state_dict(), "relora_steps": 2})
    assert all(p.requires_grad for p in weights) and not any(p.requires_grad for p in adapters)


@pytest.mark.parametrize("stop_at", [2, 3, 4])
def test_cli_resume_across_the_warm_start_switch_is_bit_identical(tmp_path, tiny_args, stop_at):
    """Warm start of 3 steps, restarts 2 steps after it (step 5): stopping before the switch, exactly at it and
    after it gives the uninterrupted run's per-step losses and final weights (W, adapters) bit for bit."""
    config = tmp_path / "relora.json"
    config.write_text(json.dumps({"extra": {"relora_every": 2, "relora_warmup": 1, "relora_warm_start": 3}}))
    common = [*tiny_args, "--config", str(config), "--method", "relora", "--rank", "4", "--steps", "6",
              "--save-every", "1", "--dropout", "0.0", "--model-dropout", "0.0", "--lr", "1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--out", str(split), "--stop-at", str(stop_at)]) == 0
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0
    assert _losses(split) == _losses(straight) and len(_losses(straight)) == 6
    a, b = load_file(straight / "trainable.safetensors"), load_file(split / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".adapters." in k for k in a) and any(k.endswith("base_layer.weight") for k in a)
    lrs = [r["lr"] for r in read_jsonl(straight / "metrics.jsonl") if "lr" in r]
    assert lrs[3] < lrs[2] and lrs[5] < lrs[4], f"no warm-up after the switch / the merge: {lrs}"
