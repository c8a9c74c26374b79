"""--layerwise with --grad-accum K: micro-batches accumulate inside backward, the last one steps
(leantrain/layerwise.py; GaLore's low-rank accumulation: leantrain/optim/projector.py ``accumulate``).

Compared with ordinary accumulation (every gradient summed in ``p.grad``, one ``optimizer.step()``): equal for
unprojected optimizers; for GaLore equal between refreshes, and at a refresh step the basis is the first
micro-batch's; the accumulators of projected matrices are r x n; clipping, non-finite policies, resume.
"""
from __future__ import annotations

import json

import pytest
import torch

from leantrain.config import TrainConfig
from leantrain.layerwise import LayerwiseStep
from leantrain.memory import estimate_config
from leantrain.optim.galore import GaLoreAdamW, GaLoreAdamW8bit
from leantrain.optim.projector import basis_options, compute_basis, projection_side
from leantrain.train import train

LM = {"task": "causal-lm", "init_weights": "scratch", "arch": "llama", "preset": "tiny", "method": "full",
      "train_size": 64, "val_size": 16, "progress": False, "overwrite": True, "batch_size": 4}
RANK = 4


def _losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "lr" in r]


def _stack() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 1))


def _batches(step: int, micros: int, same: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    xs = [torch.randn(8, 24, generator=gen) for _ in range(micros)]
    return [xs[0]] * micros if same else xs


def _loss(model: torch.nn.Module, x: torch.Tensor, micros: int) -> torch.Tensor:
    return model(x).square().mean() / micros


def _galore(model: torch.nn.Module, cls=GaLoreAdamW, gap: int = 100) -> torch.optim.Optimizer:
    mats = [p for p in model.parameters() if p.ndim == 2 and min(p.shape) > RANK]
    rest = [p for p in model.parameters() if not any(p is q for q in mats)]
    return cls([{"params": rest}, {"params": mats, "rank": RANK, "update_proj_gap": gap}], lr=1e-2)


def _ordinary(steps: list[list[torch.Tensor]], cls=GaLoreAdamW, gap: int = 100) -> torch.nn.Module:
    model = _stack()
    opt = _galore(model, cls, gap)
    for xs in steps:
        opt.zero_grad(set_to_none=True)
        for x in xs:
            _loss(model, x, len(xs)).backward()
        opt.step()
    return model


def _inside_backward(steps: list[list[torch.Tensor]], cls=GaLoreAdamW, gap: int = 100, **hook_opts):
    model = _stack()
    opt = _galore(model, cls, gap)
    hooks = LayerwiseStep(opt, model, **hook_opts).register()
    for step, xs in enumerate(steps):
        hooks.start_step(step)
        for micro, x in enumerate(xs):
            hooks.start_micro(micro, len(xs))
            _loss(model, x, len(xs)).backward()
        hooks.finish()
    return model, opt, hooks


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_galore_equals_ordinary_accumulation_between_refreshes(cls) -> None:
    """Step 1 (a refresh) on identical micro-batches, so both bases agree; steps 2-6 (no refresh) on distinct
    ones: the summed projections equal the projection of the sum."""
    steps = [_batches(0, 3, same=True)] + [_batches(s, 3) for s in range(1, 6)]
    ordinary = _ordinary(steps, cls)
    inside, opt, _ = _inside_backward(steps, cls)
    assert _max_diff(ordinary, inside) <= 1e-6
    assert all("proj_grad_accum" not in st for st in opt.state.values())  # consumed by each step


def test_galore_refresh_takes_the_first_micro_batch_basis() -> None:
    """Across a refresh with identical micro-batches the runs agree; with distinct ones the new basis is the one
    of the first micro-batch's gradient (the documented difference from ordinary accumulation)."""
    same = [_batches(s, 2, same=True) for s in range(4)]
    assert _max_diff(_ordinary(same, gap=2), _inside_backward(same, gap=2)[0]) <= 1e-6
    steps = [_batches(s, 2) for s in range(3)]  # refreshes at steps 1 and 3
    after_two, _, hooks = _inside_backward(steps[:2], gap=2)  # deterministic: the state step 3 starts from
    hooks.remove()
    _loss(after_two, steps[2][0], 2).backward()
    first_grad = after_two[2].weight.grad.float()
    model, opt, _ = _inside_backward(steps, gap=2)
    weight = model[2].weight
    group = next(g for g in opt.param_groups if any(p is weight for p in g["params"]))
    side = projection_side(tuple(weight.shape), "std")
    expected, _ = compute_basis(first_grad, RANK, side, **basis_options(group, 3))
    torch.testing.assert_close(opt.state[weight]["proj_basis"], expected, rtol=0, atol=1e-6)


def test_projected_accumulators_are_low_rank() -> None:
    """Between micro-batches a projected m x n matrix holds r x max(m, n) fp32; the others their full gradient."""
    steps = [_batches(0, 2)]
    model = _stack()
    opt = _galore(model)
    hooks = LayerwiseStep(opt, model).register()
    hooks.start_step(0)
    hooks.start_micro(0, 2)
    _loss(model, steps[0][0], 2).backward()
    assert all(p.grad is None for p in model.parameters())
    low = {tuple(p.shape): opt.state[p]["proj_grad_accum"].numel() for p in model.parameters()
           if "proj_grad_accum" in opt.state[p]}
    assert low == {(40, 24): RANK * 40, (32, 40): RANK * 40}
    full = sum(p.numel() for p in model.parameters() if tuple(p.shape) not in low)
    assert hooks.held_bytes() == 4 * (full + sum(low.values()))
    hooks.start_micro(1, 2)
    _loss(model, steps[0][1], 2).backward()
    hooks.finish()
    assert hooks.held_bytes() == 0 and hooks.stepped == len(list(model.parameters()))


@pytest.mark.parametrize("optim", ["adamw", pytest.param("adamw8bit", marks=pytest.mark.slow)])
def test_unprojected_run_equals_ordinary_accumulation(optim: str, tmp_path) -> None:
    opts = dict(LM, optim=optim, steps=6, grad_clip=None, grad_accum=2)
    train(TrainConfig(out=str(tmp_path / "ordinary"), **opts))
    train(TrainConfig(out=str(tmp_path / "layerwise"), layerwise=True, **opts))
    ordinary, layerwise = _losses(tmp_path / "ordinary"), _losses(tmp_path / "layerwise")
    assert len(ordinary) == len(layerwise) == 6
    assert max(abs(a - b) for a, b in zip(ordinary, layerwise)) <= 1e-6


def test_galore_run_resumes_bit_exactly_and_holds_less(tmp_path) -> None:
    opts = dict(LM, optim="galore-adamw8bit", gap=2, rank=RANK, steps=5, grad_accum=2, layerwise=True)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), stop_at=3, **opts))
    train(TrainConfig(out=str(tmp_path / "parts"), resume=True, **{k: v for k, v in opts.items()
                                                                   if k != "overwrite"}))
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "parts")
    assert ((tmp_path / "whole" / "trainable.safetensors").read_bytes()
            == (tmp_path / "parts" / "trainable.safetensors").read_bytes())
    assert 0 < whole["layerwise_held_grad_bytes"] < whole["grad_bytes"]
    cfg, vocab = TrainConfig(out="x", **opts), whole["vocab_size"]  # the estimator counts what the hooks held
    held = (estimate_config(cfg, vocab_size=vocab).gradients
            - estimate_config(cfg, vocab_size=vocab, grad_accum=1).gradients)
    assert held == whole["layerwise_held_grad_bytes"]


def test_clipping_acts_on_the_accumulated_gradient() -> None:
    clip, micros = 0.05, 2
    xs = _batches(0, micros)
    reference = _stack()
    for x in xs:
        (_loss(reference, x, micros) * 100).backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    model = _stack()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = LayerwiseStep(torch.optim.SGD(model.parameters(), lr=1.0), model, grad_clip=clip).register()
    hooks.start_step(0)
    for micro, x in enumerate(xs):
        hooks.start_micro(micro, micros)
        (_loss(model, x, micros) * 100).backward()
    hooks.finish()
    clipped = 0
    for name, p in model.named_parameters():
        g = grads[name]
        clipped += float(g.norm()) > clip
        expected = g * min(1.0, clip / (float(g.norm()) + 1e-6))
        torch.testing.assert_close(before[name] - p.detach(), expected, rtol=1e-5, atol=1e-7)
    assert clipped >= 3


def test_non_finite_micro_batch_gradient() -> None:
    """skip: the parameter with a NaN in micro-batch 1 of 2 keeps its weights, the others step; stop: raises."""
    model = _stack()
    before = model[4].bias.detach().clone()
    hooks = LayerwiseStep(torch.optim.SGD(model.parameters(), lr=1.0), model, nan_policy="skip").register()
    hooks.start_step(0)
    xs = _batches(0, 2)
    hooks.start_micro(0, 2)
    (_loss(model, xs[0], 2) + model[4].bias.sum() * float("nan")).backward()
    hooks.start_micro(1, 2)
    _loss(model, xs[1], 2).backward()
    hooks.finish()
    assert hooks.skipped_updates == 1 and torch.equal(model[4].bias.detach(), before)
    assert hooks.stepped == len(list(model.parameters())) - 1
    model = _stack()
    hooks = LayerwiseStep(torch.optim.SGD(model.parameters(), lr=1.0), model, nan_policy="stop").register()
    hooks.start_step(0)
    hooks.start_micro(0, 2)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in 4\.bias"):
        (_loss(model, xs[0], 2) + model[4].bias.sum() * float("nan")).backward()


def test_discarded_step_forgets_what_earlier_micro_batches_summed() -> None:
    model = _stack()
    opt = _galore(model)
    before = [p.detach().clone() for p in model.parameters()]
    hooks = LayerwiseStep(opt, model, nan_policy="skip").register()
    hooks.start_step(0)
    hooks.start_micro(0, 2)
    _loss(model, _batches(0, 2)[0], 2).backward()
    hooks.start_micro(1, 2, discard=True)  # the loop saw a non-finite loss: no backward, no update
    assert hooks.held_bytes() == 0
    assert all("proj_grad_accum" not in st for st in opt.state.values())
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_refused_under_torchrun() -> None:
    model = _stack()
    with pytest.raises(ValueError, match="--grad-accum 2.*one process") as err:
        LayerwiseStep(torch.optim.SGD(model.parameters(), lr=1.0), model, strategy="fsdp", world=2).register(
            grad_accum=2)
    assert "\n" not in str(err.value)


def test_estimator_gradient_terms() -> None:
    """Ordinary: every gradient; layerwise: the largest; under DDP the buckets keep all; accumulation adds the
    held sums, low-rank only for an optimizer that accumulates low-rank (GaLore, not APOLLO)."""
    from leantrain.memory import estimate

    def grads(optim: str, **kw) -> int:
        return estimate("llama-60m", optim=optim, rank=128, **kw).gradients

    every, one = grads("galore-adamw"), grads("galore-adamw", layerwise=True)
    assert one == 32000 * 512 * 4 < every / 3  # the embedding, the largest tensor
    assert grads("galore-adamw", layerwise=True, ddp=True) == every
    low = grads("galore-adamw", layerwise=True, grad_accum=4) - one
    full = grads("apollo", layerwise=True, grad_accum=4) - grads("apollo", layerwise=True)
    assert full == every  # APOLLO reads the full gradient: it accumulates it
    assert 0 < low < full


def _registered() -> list[str]:
    from leantrain.optim.registry import specs

    return sorted(specs())


@pytest.mark.parametrize("name", _registered())
def test_spec_declares_what_the_optimizer_accumulates(name: str) -> None:
    """``low_rank_accumulation`` (what the estimator reads) matches what the optimizer does with a 2-D weight."""
    from types import SimpleNamespace

    from leantrain.optim.registry import specs

    spec = specs()[name]
    w = torch.nn.Parameter(torch.randn(48, 32))
    opts = SimpleNamespace(betas=(0.9, 0.999), weight_decay=0.0, block_size=256, compile_optim=False, rank=RANK,
                           gap=10, proj_scale=0.25, svd="randomized", state_dtype="fp32")
    opt = spec.build([{"params": [w], "name": "linear"}], opts, 1e-3)
    accumulate = getattr(opt, "accumulate_projected", None)
    low = accumulate(w, torch.randn(48, 32)) if accumulate is not None else None
    assert (low is not None) == spec.low_rank_accumulation
    if low is not None:
        assert low.shape == (48, RANK)


def test_accumulates_with_a_quantized_basis() -> None:
    """Q-GaLore's ``proj_bits`` keeps the basis as codes (no ``proj_basis`` tensor): accumulation reads it through
    ``projector.current_basis`` like ``project`` does (it raised KeyError before)."""
    model = _stack()
    mats = [p for p in model.parameters() if p.ndim == 2 and min(p.shape) > RANK]
    rest = [p for p in model.parameters() if not any(p is q for q in mats)]
    opt = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": RANK, "update_proj_gap": 2, "proj_bits": 4}],
                      lr=1e-2)
    hooks = LayerwiseStep(opt, model).register()
    for step, xs in enumerate(_batches(s, 2) for s in range(4)):
        hooks.start_step(step)
        for micro, x in enumerate(xs):
            hooks.start_micro(micro, 2)
            _loss(model, x, 2).backward()
        hooks.finish()
        assert hooks.stepped == len(list(model.parameters()))
    assert all("proj_basis" not in opt.state[p] for p in mats)
