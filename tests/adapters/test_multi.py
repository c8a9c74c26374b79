"""Several adapters per model: switching, summing, disabling, combining (linear / SVD) and deleting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 10)
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(x))))


def two_adapters() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP().eval()
    adapters.inject(model, LoraConfig(r=2, alpha=4, target_modules=["lin0", "emb"], init="random"), name="a")
    adapters.inject(
        model,
        LoraConfig(r=3, alpha=3, target_modules=["lin0", "lin1"], init="random", use_rslora=True),
        name="b",
    )
    return model, torch.randint(0, 30, (4, 5))


def outputs(model: nn.Module, x: torch.Tensor, active) -> torch.Tensor:
    adapters.set_active(model, active)
    return model(x)


def test_switch_and_sum_active_adapters():
    model, x = two_adapters()
    ya, yb = outputs(model, x, "a"), outputs(model, x, ["b"])
    assert (ya - yb).abs().max() > 1e-3
    h = torch.randn(3, 10)
    with adapters.disable(model):
        y0, h0 = model(x), model.lin0(h)
    assert (ya - y0).abs().max() > 1e-3
    ha, hb = outputs(model.lin0, h, "a"), outputs(model.lin0, h, "b")
    adapters.set_active(model, ["a", "b"])
    assert adapters.active_adapters(model) == ["a", "b"]
    # within one layer the active adapters' contributions add up
    torch.testing.assert_close(model.lin0(h) - h0, (ha - h0) + (hb - h0), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['c'\]"):
        adapters.set_active(model, ["c"])


def test_merge_selected_adapter_only():
    model, x = two_adapters()
    adapters.set_active(model, ["a", "b"])
    expected = model(x)
    assert adapters.merge(model, ["b"]) == ["b"]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)  # a unmerged + b merged
    with pytest.raises(ValueError, match=r"\['b'\] are already merged"):
        adapters.merge(model, "b")
    with pytest.raises(ValueError, match="unmerge first"):
        adapters.set_active(model, "a")
    assert adapters.unmerge(model) == ["b"]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, -2.0)])
def test_combine_linear_is_exact(weights):
    model, x = two_adapters()
    layers = adapters.combine(model, ["a", "b"], list(weights), "ab", how="linear")
    assert sorted(layers) == ["emb", "lin0", "lin1"]
    assert adapters.active_adapters(model) == ["a", "b"], "combine does not activate the new adapter"
    wa, wb = weights
    for name in layers:
        layer = model.get_submodule(name)
        expected = sum(w * layer.delta_weight(n) for n, w in (("a", wa), ("b", wb)) if n in layer.adapters)
        torch.testing.assert_close(layer.delta_weight("ab"), expected, atol=1e-5, rtol=1e-5)
    h = torch.randn(3, 10)
    with adapters.disable(model):
        h0 = model.lin0(h)
    ha, hb, hab = (outputs(model.lin0, h, n) for n in ("a", "b", "ab"))
    torch.testing.assert_close(hab - h0, wa * (ha - h0) + wb * (hb - h0), atol=1e-5, rtol=1e-5)
    assert model.lin0.adapters["ab"].r == 5 and model.lin0.adapters["ab"].scaling == 1.0


def test_combine_svd_truncates_to_best_rank_r():
    model, _ = two_adapters()
    adapters.combine(model, ["a", "b"], [1.0, 0.7], "svd", how="svd", r=3)
    lin0 = model.lin0
    target = lin0.delta_weight("a") + 0.7 * lin0.delta_weight("b")
    got = lin0.delta_weight("svd")
    assert torch.linalg.matrix_rank(got) == 3
    u, s, vh = torch.linalg.svd(target)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)


def test_combine_bad_input():
    model, _ = two_adapters()
    with pytest.raises(ValueError, match="one weight per adapter"):
        adapters.combine(model, ["a", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="how='mean'"):
        adapters.combine(model, ["a", "b"], [1.0, 1.0], "x", how="mean")
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"], use_dora=True), name="d")
    with pytest.raises(TypeError, match="plain LoRA adapters only; 'd' is LoraConfig with DoRA"):
        adapters.combine(model, ["a", "d"], [1.0, 1.0], "x")


def test_delete_one_of_two():
    model, x = two_adapters()
    yb = outputs(model, x, "b")
    adapters.delete(model, "a")
    assert adapters.adapter_names(model) == ["b"]
    assert type(model.emb) is nn.Embedding, "emb only held adapter 'a' and is unwrapped"
    torch.testing.assert_close(outputs(model, x, "b"), yb)
    adapters.merge(model)
    with pytest.raises(ValueError, match="unmerge before deleting"):
        adapters.delete(model, "b")


# ---- deletion and activation semantics (PEFT's rule for deleting the active adapter) ------------------------------
def test_deleting_the_active_adapter_activates_a_remaining_one_loudly():
    model, x = two_adapters()
    yb = outputs(model, x, "b")
    adapters.set_active(model, "a")
    with pytest.warns(UserWarning, match="adapter 'a' was active and is deleted; adapter 'b' is now active"):
        assert adapters.delete(model, "a") == "b"
    assert adapters.active_adapters(model) == ["b"]
    torch.testing.assert_close(model(x), yb)  # not the base model


@pytest.mark.parametrize("active", [["b"], ["a", "b"]])
def test_deleting_leaves_other_active_adapters_alone(active, recwarn):
    model, x = two_adapters()
    yb = outputs(model, x, "b")
    adapters.set_active(model, active)
    assert adapters.delete(model, "a") is None
    assert adapters.active_adapters(model) == ["b"] and not recwarn.list
    torch.testing.assert_close(model(x), yb)


def test_deleting_the_last_adapter_restores_the_base_model():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randint(0, 30, (4, 5))
    y0 = model(x)
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"], init="random"), name="only")
    assert adapters.delete(model, "only") is None
    assert type(model.lin0) is nn.Linear and adapters.adapter_names(model) == []
    torch.testing.assert_close(model(x), y0)


def test_a_new_adapter_is_active_and_trains_beside_the_old_one():
    """leantrain's documented difference from PEFT: ``inject`` activates the adapter it adds (so that it
    trains), and earlier active adapters stay active, frozen (PEFT's add_adapter leaves the new one inactive)."""
    model, _ = two_adapters()
    assert adapters.active_adapters(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)


@pytest.mark.peer
def test_delete_matches_peft():
    """Same model, same adapters, same deletion: PEFT and leantrain end with the same active adapter."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP().eval(), peft.LoraConfig(r=2, target_modules=["lin0", "lin1"]), adapter_name="p")
    pm.add_adapter("q", peft.LoraConfig(r=2, target_modules=["lin0", "lin1"]))
    pm.set_adapter("p")
    ours = MLP().eval()
    for name in ("p", "q"):
        adapters.inject(ours, LoraConfig(r=2, target_modules=["lin0", "lin1"]), name=name)
    adapters.set_active(ours, "p")
    for model, delete in ((pm, pm.delete_adapter), (ours, lambda n: adapters.delete(ours, n))):
        with pytest.warns(UserWarning, match=r"\bp\b.*(active|deleted)"):
            delete("p")
    assert list(pm.base_model.model.lin0.active_adapters) == adapters.active_adapters(ours) == ["q"]
