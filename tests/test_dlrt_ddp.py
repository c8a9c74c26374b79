"""DLRT and LoRA/DoRA under torchrun DDP (2 gloo processes) against 1 process (docs/distributed.md).

DLRT: the former 2.1e-5 loss gap came from the basis augmentation, which padded [U0 | K1] with Householder columns
made of float rounding whenever the K step had rank < r; the S step gave those directions a full Adam step, so a
rounding-level gradient difference moved U S Vᵀ by one lr. These tests pin the fixed behaviour.

LoRA/DoRA: losses agree, final weights differ by up to ~1e-5. Measured cause: Adam's first step on an entry is
lr·g/(|g|+eps), whose slope at g≈0 is lr/eps = 1e5, so a rounding-level gradient difference (2.2e-10 on a
gradient of -4.7e-9 in lora_B at step 1) becomes a 1.02e-5 weight difference. The test checks every entry against
the first-order bound of that mechanism, computed from both runs' gradients and Adam's denominators.

Run as a script (``torchrun ... tests/test_dlrt_ddp.py MODE DIR train-args...``) it is the worker: MODE "hashes"
records a sha256 of every rank's U, S, V after each step, MODE "adam" records rank 0's gradients, Adam second
moments, learning rates and weights per step.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")

LR = 1e-3
BASE = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--lr", str(LR), "--steps", "4", "--dropout", "0", "--model-dropout", "0",
        "--method", "dlrt"]
LOSS_TOL = 1e-6  # issue #20 item 5; measured 1.2e-7 (2 processes) and <= 2.4e-7 (32 perturbed seeds)
# U S Vᵀ: the old augmentation moved it by ~lr (1.3e-3 after step 1). What remains is Adam's sign-like first step
# on S entries whose gradient is near zero (<= 4.6e-5 over 32 perturbed seeds, 2.1e-6 for 2 processes): 0.1 lr.
PRODUCT_TOL = 0.1 * LR


def _losses(run: Path) -> list[float]:
    from leantrain.report import read_jsonl

    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def _products(run: Path) -> dict[str, torch.Tensor]:
    """U S Vᵀ per low-rank layer from trainable.safetensors (invariant to the bases' signs and rotations)."""
    from safetensors.torch import load_file

    w = load_file(run / "trainable.safetensors")
    return {k[:-2]: w[k[:-2] + ".U"].double() @ w[k[:-2] + ".S"].double() @ w[k[:-2] + ".V"].double().T
            for k in w if k.endswith(".U")}


def _gaps(a: Path, b: Path) -> tuple[float, float]:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 4
    pa, pb = _products(a), _products(b)
    assert pa.keys() == pb.keys() and pa
    return (max(abs(x - y) for x, y in zip(la, lb)),
            max(float((pa[k] - pb[k]).abs().max()) for k in pa))


def _record_factor_hashes(out: Path) -> None:
    """Wrap KLSOptimizer.step: after every step, a sha256 of each layer's U, S, V on this rank -> out/rankN.json."""
    from leantrain.lowrank.optimizer import KLSOptimizer

    steps: list[dict[str, str]] = []
    step = KLSOptimizer.step

    def recording(self, closure=None):
        loss = step(self, closure)
        steps.append({name: hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                                    for t in (layer.U, layer.S, layer.V))).hexdigest()
                      for name, layer in self.layers.items()})
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(steps))
        return loss

    KLSOptimizer.step = recording


def _torchrun_worker(mode: str, out: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           mode, str(out), *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _record_adam_steps(out: Path):
    """After every optimizer step (rank 0): gradient, exp_avg_sq, lr and weight of each parameter, in the
    optimizer's order, to out/steps.safetensors (step.param.field keys). Returns the hook handle."""
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_post_hook

    record: dict[str, torch.Tensor] = {}
    count = [0]

    def post(opt, args, kwargs) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        t = count[0] = count[0] + 1
        params = [p for g in opt.param_groups for p in g["params"]]
        record[f"{t}.lr"] = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)
        for i, p in enumerate(params):
            record[f"{t}.{i}.w"] = p.detach().clone()
            record[f"{t}.{i}.g"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            record[f"{t}.{i}.v"] = opt.state[p]["exp_avg_sq"].detach().clone()
        save_file(record, str(out / "steps.safetensors"))

    return register_optimizer_step_post_hook(post)


def _adam_gap_bound(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], eps: float = 1e-8,
                    beta2: float = 0.999) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per parameter: (final |w1 - w2|, first-order bound). Adam's step is lr·m̂/(sqrt(v̂)+eps); a gradient
    difference Δg_s (s <= t) changes it by at most 2·lr_t·max_s|Δg_s| / (sqrt(v̂_t)+eps) (m̂ is a convex mix of the
    gradients so far; v̂'s change costs at most as much again). Summed over steps, plus 4 ulps of the weight."""
    steps = max(int(k.split(".")[0]) for k in one)
    n = len([k for k in one if k.startswith("1.") and k.endswith(".w")])
    out = []
    for i in range(n):
        w1 = one[f"{steps}.{i}.w"].double()
        bound, dg = torch.zeros_like(w1), torch.zeros_like(w1)
        for t in range(1, steps + 1):
            dg = torch.maximum(dg, (one[f"{t}.{i}.g"].double() - two[f"{t}.{i}.g"].double()).abs())
            denom = (one[f"{t}.{i}.v"].double() / (1 - beta2**t)).sqrt() + eps
            bound += 2 * float(one[f"{t}.lr"]) * dg / denom
        w2 = two[f"{steps}.{i}.w"].double()
        ulps = 4 * torch.finfo(torch.float32).eps * torch.maximum(w1.abs(), w2.abs())
        out.append(((w1 - w2).abs(), bound + ulps))
    return out


@pytest.mark.slow
def test_dlrt_two_processes_match_one_and_ranks_hold_identical_factors(tmp_path):
    from leantrain.cli import main

    one, two, hashes = tmp_path / "one", tmp_path / "two", tmp_path / "hashes"
    hashes.mkdir()
    assert main(["train", *BASE, "--out", str(one)]) == 0
    _torchrun_worker("hashes", hashes, [*BASE, "--strategy", "ddp", "--out", str(two)])
    r0 = json.loads((hashes / "rank0.json").read_text())
    r1 = json.loads((hashes / "rank1.json").read_text())
    assert len(r0) == 4 and r0 == r1  # bitwise the same U, S, V on both ranks after every step
    loss_gap, product_gap = _gaps(one, two)
    assert loss_gap < LOSS_TOL
    assert product_gap < PRODUCT_TOL


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_dlrt_rounding_noise_in_gradients_stays_rounding_in_the_loss(tmp_path, monkeypatch, seed):
    """1 process, every gradient multiplied by (1 + 2^-23 N(0,1)) -- the size of the 1-vs-2-process difference.
    Before the fix this alone moved the 4-step losses by 0.6-3.1e-5 and U S Vᵀ by 0.9-1.5e-3 (8 seeds)."""
    from leantrain import loop
    from leantrain.cli import main
    from leantrain.lowrank.optimizer import KLSOptimizer

    ref, noisy = tmp_path / "ref", tmp_path / "noisy"
    assert main(["train", *BASE, "--out", str(ref)]) == 0
    gen = torch.Generator().manual_seed(seed)

    def perturb(params) -> None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1 + 2.0**-23 * torch.randn(p.grad.shape, generator=gen))

    closure_call, s_grads = loop.Closure.__call__, KLSOptimizer._s_grads_from_cache

    def noisy_closure(self):
        loss = closure_call(self)
        perturb(self.task.model.parameters())
        return loss

    def noisy_s_grads(self, layers, *args):  # S's gradient comes from cached activations, outside the closure
        s_grads(self, layers, *args)
        perturb([layer.S for layer in layers])

    monkeypatch.setattr(loop.Closure, "__call__", noisy_closure)
    monkeypatch.setattr(KLSOptimizer, "_s_grads_from_cache", noisy_s_grads)
    assert main(["train", *BASE, "--out", str(noisy)]) == 0
    loss_gap, product_gap = _gaps(ref, noisy)
    assert loss_gap < LOSS_TOL
    assert product_gap < PRODUCT_TOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_weight_gap_under_ddp_is_adams_amplification_of_rounding(tmp_path, method):
    """Losses within 1e-5 (measured 1.2e-7); every final weight entry within the first-order bound of Adam's
    amplification of the measured 1-vs-2-process gradient differences (measured: lora_B of layer 1's
    intermediate dense, 1.02e-5 = 1/3 of its entry's bound 3.0e-5, which comes from step 1's sqrt(v̂)+eps = 1.5e-8)."""
    from safetensors.torch import load_file

    from leantrain.cli import main

    args = [a if a != "dlrt" else method for a in BASE] + ["--optim", "adamw"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    handle = _record_adam_steps(one)
    try:
        assert main(["train", *args, "--out", str(one / "run")]) == 0
    finally:
        handle.remove()
    _torchrun_worker("adam", two, [*args, "--strategy", "ddp", "--out", str(two / "run")])
    la, lb = _losses(one / "run"), _losses(two / "run")
    assert len(la) == len(lb) == 4 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    rec1, rec2 = load_file(one / "steps.safetensors"), load_file(two / "steps.safetensors")
    # the input of the mechanism: at step 1 (same weights) the gradients differ by rounding only (measured <= 7.7
    # float32 ulps of each tensor's largest gradient)
    for key in (k for k in rec1 if k.startswith("1.") and k.endswith(".g")):
        scale = float(rec1[key].abs().max())
        assert float((rec1[key] - rec2[key]).abs().max()) <= 32 * torch.finfo(torch.float32).eps * scale, key
    gaps = _adam_gap_bound(rec1, rec2)
    assert gaps
    for i, (gap, bound) in enumerate(gaps):
        worst = int((gap - bound).argmax())
        assert bool((gap <= bound).all()), (i, float(gap.view(-1)[worst]), float(bound.view(-1)[worst]))


if __name__ == "__main__":  # torchrun worker: MODE DIR, then the arguments of `leantrain train`
    {"hashes": _record_factor_hashes, "adam": _record_adam_steps}[sys.argv[1]](Path(sys.argv[2]))
    from leantrain.cli import main as _main

    sys.exit(_main(["train", *sys.argv[3:]]))
