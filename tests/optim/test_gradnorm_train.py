"""GradNormLoRP with the optimizers: training lowers the loss (32- and 8-bit states), optimizer memory as in the
spec (B.3 check 4), exact merge after training, and the CLI path (train -> resume -> merged weights)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain.config import TrainConfig
from leantrain.optim import build_optimizer
from leantrain.optim.adam import AdamW, AdamW8bit
from leantrain.optim.gradnorm import GRADNORMLORP, WeightNormLinear, merge

RANK = 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 64)
        self.lin1 = nn.Linear(64, 512)  # V is 512 x 64 -> right projection, moments 512 x 8 = 4096 (8-bit size)
        self.classifier = nn.Linear(512, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


def _setup(optim: str, lr: float = 3e-3):
    torch.manual_seed(0)
    model = Net()
    cfg = TrainConfig(method="gradnormlorp", optim=optim, rank=RANK, gap=10, proj_scale=1.0, svd="randomized",
                      weight_decay=0.0)
    groups = GRADNORMLORP.apply(model, cfg)
    groups.append({"params": list(model.classifier.parameters()), "name": "head"})  # as train.py does
    return model, build_optimizer(optim, groups, cfg, lr)


def _data(n: int = 40):
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(16, 3, generator=g)
    x = torch.randn(n, 32, 16, generator=g)
    return x, (x @ teacher).argmax(-1)


def _train(model, opt, x, y):
    losses = []
    for xb, yb in zip(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("optim,cls", [("adamw", AdamW), ("adamw8bit", AdamW8bit)])
def test_training_lowers_the_loss(optim, cls):
    model, opt = _setup(optim)
    assert type(opt) is cls  # the registry's "adamw" switches to leantrain's AdamW for projected groups
    x, y = _data()
    losses = _train(model, opt, x, y)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    v = model.lin1.weight_v
    st = opt.state[v]
    assert tuple(st["proj_basis"].shape) == (RANK, 64) and st["proj_refreshes"] == 4  # steps 1, 11, 21, 31
    if optim == "adamw8bit":
        assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_codes"].numel() == 512 * RANK
    assert model.lin1.weight_g.grad is not None and not torch.equal(  # the magnitude is learned (not reset)
        model.lin1.weight_g.detach(), model.lin1.weight_v.detach().norm(dim=1))


def test_optimizer_memory_matches_the_spec():
    """Spec B.3 check 4, m x n = 512 x 64, right projection: 2*m*r (moments) + r*n (basis) + 2*m (moments of g),
    and no state tensor as large as V."""
    model, opt = _setup("adamw")
    x, y = _data(2)
    _train(model, opt, x, y)
    m, n = 512, 64
    v, g = model.lin1.weight_v, model.lin1.weight_g

    def floats(p):
        return sum(t.numel() for k, t in opt.state[p].items() if isinstance(t, torch.Tensor) and k != "step")

    assert floats(v) == 2 * m * RANK + RANK * n
    assert floats(g) == 2 * m
    assert max(t.numel() for t in opt.state[v].values() if isinstance(t, torch.Tensor)) < m * n


def test_merge_after_training_is_exact():
    model, opt = _setup("adamw8bit")
    x, y = _data(12)
    _train(model, opt, x, y)
    out = model(x[0])
    merge(model)
    assert not any(isinstance(mod, WeightNormLinear) for mod in model.modules())
    torch.testing.assert_close(model(x[0]), out, atol=1e-6, rtol=0)


@pytest.mark.slow  # three CLI runs, ~25 s on a loaded machine
def test_cli_run_resumes_exactly_and_writes_merged_weights(tmp_path, tiny_args):
    from safetensors.torch import load_file

    from leantrain.cli import main
    from leantrain.models import build_classifier
    from leantrain.report import read_jsonl

    common = [*tiny_args, "--method", "gradnormlorp", "--optim", "adamw8bit", "--rank", "4", "--gap", "3",
              "--steps", "6", "--save-every", "3", "--dropout", "0.0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--out", str(split), "--stop-at", "3"]) == 0
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0

    def losses(path):
        return [(r["step"], r["loss"]) for r in read_jsonl(path / "metrics.jsonl") if "loss" in r]

    assert losses(split) == losses(straight)  # the projector state survives the checkpoint
    merged = load_file(straight / "merged_model.safetensors")
    manifest = json.loads((straight / "merged_model.json").read_text())
    assert len(manifest["merged_layers"]) == 12
    fresh = build_classifier("tiny", 3)
    fresh.load_state_dict(merged, strict=True)  # a plain model: no weight_g / weight_v keys
    assert not any(k.endswith(("weight_g", "weight_v")) for k in merged)
