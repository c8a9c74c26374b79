"""The ``dlrt`` method on the tiny random BERT classifier: apply -> wrap_optimizer -> step -> checkpoint hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain.config import TrainConfig
from leantrain.lowrank import LowRankLinear, lowrank_layers
from leantrain.methods import get_method

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny():
    from leantrain.models import build_classifier

    return build_classifier("tiny", 3)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (4, 12), generator=g), torch.ones(4, 12, dtype=torch.long), torch.tensor([0, 1, 2, 1])


def _setup(model, cfg, optim="adamw"):
    import copy

    model = copy.deepcopy(model)
    method = get_method("dlrt")
    groups = method.apply(model, cfg)
    groups.append({"params": list(model.classifier.parameters()), "name": "head"})
    inner = (torch.optim.AdamW(groups, lr=1e-3) if optim == "adamw" else torch.optim.SGD(groups, lr=0.05))
    return model, method, method.wrap_optimizer(inner, model, cfg)


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_apply_wrap_and_step(tiny, optim):
    cfg = TrainConfig(method="dlrt", model="tiny", tau=0.3, rank=4)
    model, method, opt = _setup(tiny, cfg, optim)
    names = [n for n, _ in lowrank_layers(model)]
    linears = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear) and "classifier" not in n]
    assert names == linears and isinstance(model.classifier, nn.Linear)
    for _, layer in lowrank_layers(model):
        assert isinstance(layer, LowRankLinear) and layer.min_rank == 4 and layer.max_rank == 16
    ids, mask, y = _batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids, mask), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    m = method.metrics(model)
    assert {"dlrt/mean_rank", "dlrt/params", "dlrt/compression"} <= set(m)
    assert m["dlrt/mean_rank"] == pytest.approx(sum(opt.ranks().values()) / len(names))
    assert all(isinstance(v, float) for v in m.values())


def test_checkpoint_hooks_resize_a_fresh_model(tiny):
    cfg = TrainConfig(method="dlrt", model="tiny", tau=0.5, rank=2, extra={"dlrt_recompute_s": True})
    model, method, opt = _setup(tiny, cfg, "sgd")
    ids, mask, y = _batch()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids, mask), y)
        loss.backward()
        return loss

    start = opt.ranks()
    for _ in range(2):
        opt.step(closure)
    assert opt.ranks() != start, "ranks did not move; resizing on load would be untested"
    state = method.trainable_state(model)
    fresh, method2, opt2 = _setup(tiny, cfg, "sgd")
    method2.load_trainable_state(fresh, state)
    opt2.load_state_dict(opt.state_dict())
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), fresh(ids, mask))
