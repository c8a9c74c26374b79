"""SHiRA layer: sizing, forward/backward vs the dense formula, fused merge bit-exactness, fusion, save/load,
gradient/SNIP masks through inject(calib=...), training, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters.shira import ShiraConfig, ShiraLinear, set_scale, switch


class MLP(nn.Module):  # PEFT's test model
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def _dense(layer: ShiraLinear, name: str = "default") -> torch.Tensor:
    """ΔW rebuilt from the saved PEFT tensors (independent of delta_weight)."""
    st = layer.peft_state(name)
    d = torch.zeros(layer.out_features, layer.in_features)
    rows, cols = st["shira_indices"].long()
    d[rows, cols] = st["shira_weight"].detach()
    return d


def test_param_count_and_trainable_only_values():
    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"]))
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["lin0.adapters.default.shira_weight"]
    assert trainable[0][1].numel() == 2 * (10 + 20)
    assert isinstance(m.lin0, ShiraLinear)


def test_fraction_count():
    m = _model()
    adapters.inject(m, ShiraConfig(fraction=0.25, target_modules=["lin0"]))
    assert m.lin0.adapters["default"].shira_weight.numel() == 50


def test_r_too_large_raises_naming_layer():
    with pytest.raises(ValueError, match=r"'lin0'.*20x10"):
        adapters.inject(_model(), ShiraConfig(r=7, target_modules=["lin0"]))  # 7*30=210 > 200


def test_zero_init_output_equals_base_exactly():
    m = _model()
    x = torch.randn(5, 10)
    y0 = m(x)
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], mask="magnitude"))
    assert torch.equal(m(x), y0)


def test_forward_and_grads_match_dense_formula():
    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], init_weights=False))
    layer = m.lin0
    x = torch.randn(3, 4, 10, requires_grad=True)  # 3-D input
    y = m(x)
    w_eff = (layer.base_layer.weight + _dense(layer)).detach().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = m.lin1(torch.relu(x2 @ w_eff.T + layer.base_layer.bias))
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    rows, cols = layer.peft_state("default")["shira_indices"].long()
    torch.testing.assert_close(layer.adapters["default"].shira_weight.grad, w_eff.grad[rows, cols], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_update_is_high_rank():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 64))
    adapters.inject(lin, ShiraConfig(r=1, target_modules=["0"], init_weights=False))
    d = lin[0].delta_weight("default")
    assert int((d != 0).sum()) == 128
    assert torch.linalg.matrix_rank(d) > 20  # a rank-1 LoRA of the same size has rank 1


def test_merge_forward_equals_unmerged_and_unmerge_bit_exact():
    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], init_weights=False))
    x = torch.randn(6, 10)
    y = m(x)
    w0 = m.lin0.base_layer.weight.detach().clone()
    adapters.merge(m)
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=1e-5)
    assert not torch.equal(m.lin0.base_layer.weight, w0)
    adapters.unmerge(m)
    assert torch.equal(m.lin0.base_layer.weight, w0)
    torch.testing.assert_close(m(x), y, atol=0, rtol=0)


def test_fused_remove_is_bit_exact_where_add_sub_is_not():
    # Values chosen so that (w + d) - d != w in fp32: w = 1e-8, d = 1 rounds w away.
    m = _model()
    adapters.inject(m, ShiraConfig(fraction=1.0, target_modules=["lin0"]))
    with torch.no_grad():
        m.lin0.base_layer.weight.fill_(1e-8)
        m.lin0.adapters["default"].shira_weight.fill_(1.0)
    w0 = m.lin0.base_layer.weight.detach().clone()
    naive = (w0 + 1.0) - 1.0
    assert not torch.equal(naive, w0)
    adapters.merge(m)
    adapters.unmerge(m)
    assert torch.equal(m.lin0.base_layer.weight, w0)


def test_fusion_of_two_adapters_overlapping_masks_restores_exactly():
    m = _model()
    adapters.inject(m, ShiraConfig(r=3, target_modules=["lin0"], seed=1, init_weights=False), name="a")
    adapters.inject(m, ShiraConfig(r=3, target_modules=["lin0"], seed=2, init_weights=False), name="b")
    fa, fb = m.lin0.adapters["a"].flat, m.lin0.adapters["b"].flat
    assert len(set(fa.tolist()) & set(fb.tolist())) > 0  # 90 of 200 each: they overlap
    w0 = m.lin0.base_layer.weight.detach().clone()
    want = w0 + m.lin0.delta_weight("a") + m.lin0.delta_weight("b")
    adapters.merge(m, ["a", "b"])
    torch.testing.assert_close(m.lin0.base_layer.weight, want, atol=1e-6, rtol=0)
    adapters.unmerge(m)
    assert torch.equal(m.lin0.base_layer.weight, w0)
    adapters.merge(m, ["b", "a"])  # order-independent up to fp32 round-off
    torch.testing.assert_close(m.lin0.base_layer.weight, want, atol=1e-6, rtol=0)
    adapters.unmerge(m)
    assert torch.equal(m.lin0.base_layer.weight, w0)


def test_switch_touches_only_the_adapters_entries():
    m = _model()
    adapters.inject(m, ShiraConfig(r=1, target_modules=["lin0"], seed=1, init_weights=False), name="a")
    adapters.inject(m, ShiraConfig(r=1, target_modules=["lin0"], seed=2, init_weights=False), name="b")
    w0 = m.lin0.base_layer.weight.detach().clone()
    switch(m, "a")
    changed_a = (m.lin0.base_layer.weight != w0).view(-1).nonzero().squeeze(1)
    assert set(changed_a.tolist()) <= set(m.lin0.adapters["a"].flat.tolist())
    switch(m, "b")
    changed_b = (m.lin0.base_layer.weight != w0).view(-1).nonzero().squeeze(1)
    assert set(changed_b.tolist()) <= set(m.lin0.adapters["b"].flat.tolist())
    adapters.unmerge(m)
    assert torch.equal(m.lin0.base_layer.weight, w0)


def test_set_scale_scales_the_delta():
    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], init_weights=False))
    x = torch.randn(4, 10)
    base = m.lin0.base_layer(x)
    full = m.lin0(x) - base
    set_scale(m, "default", 0.5)
    torch.testing.assert_close(m.lin0(x) - base, 0.5 * full, atol=1e-6, rtol=1e-5)


def test_save_load_round_trip_own_format(tmp_path):
    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], mask="magnitude", init_weights=False))
    x = torch.randn(4, 10)
    y = m(x)
    adapters.save(m, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["peft_type"] == "SHIRA" and body["mask_type"] == "magnitude" and body["r"] == 2
    m2 = _model()
    adapters.load(m2, tmp_path)
    torch.testing.assert_close(m2(x), y, atol=0, rtol=0)
    assert torch.equal(m2.lin0.adapters["default"].flat, m.lin0.adapters["default"].flat)


def test_save_load_fraction(tmp_path):
    m = _model()
    adapters.inject(m, ShiraConfig(fraction=0.1, target_modules=["lin0"], init_weights=False))
    adapters.save(m, tmp_path)
    m2 = _model()
    adapters.load(m2, tmp_path)
    x = torch.randn(2, 10)
    torch.testing.assert_close(m2(x), m(x), atol=0, rtol=0)


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"]))
    adapters.save(m, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(str(path))
    key = "base_model.model.lin0.shira_indices"
    dup = dict(good)
    dup[key] = good[key].clone()
    dup[key][:, 1] = dup[key][:, 0]
    save_file(dup, str(path))
    with pytest.raises(ValueError, match="duplicate"):
        adapters.load(_model(), tmp_path)
    short = dict(good)
    short["base_model.model.lin0.shira_weight"] = good["base_model.model.lin0.shira_weight"][:-1]
    save_file(short, str(path))
    with pytest.raises(ValueError, match=r"shira_weight.*\(59,\).*\(60,\)"):
        adapters.load(_model(), tmp_path)
    out = dict(good)
    out[key] = good[key].clone()
    out[key][0, 0] = 20
    save_file(out, str(path))
    with pytest.raises(ValueError, match="outside"):
        adapters.load(_model(), tmp_path)


def test_load_unsorted_indices_keeps_value_alignment(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], init_weights=False))
    x = torch.randn(3, 10)
    y = m(x)
    adapters.save(m, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    st = load_file(str(path))
    perm = torch.randperm(60)
    st["base_model.model.lin0.shira_indices"] = st["base_model.model.lin0.shira_indices"][:, perm].contiguous()
    st["base_model.model.lin0.shira_weight"] = st["base_model.model.lin0.shira_weight"][perm].contiguous()
    save_file(st, str(path))
    m2 = _model()
    adapters.load(m2, tmp_path)
    torch.testing.assert_close(m2(x), y, atol=1e-6, rtol=1e-6)


def _calib_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(8, 10, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 2, (8,), generator=g) for _ in range(3)]

    def calib(model):
        for x, y in zip(xs, ys):
            yield nn.functional.cross_entropy(model(x), y)

    return calib


@pytest.mark.parametrize("kind", ["gradient", "snip"])
def test_gradient_and_snip_masks_pick_top_scores(kind):
    calib = _calib_batches()
    ref = _model()
    w = ref.lin0.weight
    score = torch.zeros_like(w)
    for loss in calib(ref):
        (g,) = torch.autograd.grad(loss, [w])
        score += g.abs()
    if kind == "snip":
        score = (w.detach() * score).abs()
    k = 2 * 30
    want = set(torch.topk(score.reshape(-1), k).indices.tolist())

    m = _model()
    m.lin1.weight.requires_grad_(False)  # flags must be restored afterwards
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"], mask=kind), calib=calib)
    assert set(m.lin0.adapters["default"].flat.tolist()) == want
    assert m.lin0.base_layer.weight.grad is None
    assert not m.lin0.base_layer.weight.requires_grad  # inject froze the base afterwards


def test_calibration_restores_requires_grad_flags():
    from leantrain.adapters.shira import accumulate_gradients

    m = _model()
    m.lin1.weight.requires_grad_(False)
    scores = accumulate_gradients(m, ["lin0"], _calib_batches())
    assert set(scores) == {"lin0"} and scores["lin0"].shape == (20, 10)
    assert m.lin0.weight.requires_grad and not m.lin1.weight.requires_grad and m.lin1.bias.requires_grad
    assert m.lin0.weight.grad is None


def test_custom_callable_mask_receives_grad():
    seen = {}

    def rows_first(weight, k, *, seed, grad):
        seen["grad"] = grad
        return torch.arange(k)

    m = _model()
    adapters.inject(m, ShiraConfig(r=1, target_modules=["lin0"], mask=rows_first), calib=_calib_batches())
    assert seen["grad"] is not None and seen["grad"].shape == (20, 10)
    assert m.lin0.adapters["default"].flat.tolist() == list(range(30))


def test_training_lowers_loss_and_changes_only_selected_entries():
    torch.manual_seed(0)
    m = _model()
    x = torch.randn(64, 10)
    target = torch.randn(64, 2)
    w0 = m.lin0.weight.detach().clone()
    adapters.inject(m, ShiraConfig(r=2, target_modules=["lin0"]))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.0)
    first = None
    for _ in range(60):
        loss = nn.functional.mse_loss(m(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.85 * first
    assert torch.equal(m.lin0.base_layer.weight, w0)  # base untouched while training
    adapters.merge(m)
    changed = (m.lin0.base_layer.weight != w0).view(-1)
    selected = torch.zeros_like(changed)
    selected[m.lin0.adapters["default"].flat] = True
    assert changed.any() and not (changed & ~selected).any()


@pytest.mark.parametrize("kwargs,err", [
    ({"mask": "struct"}, ValueError), ({"r": 0}, ValueError), ({"fraction": 0.0}, ValueError),
    ({"fraction": 2.0}, ValueError),
])
def test_bad_config(kwargs, err):
    with pytest.raises(err):
        ShiraConfig(**kwargs)


def test_gradient_mask_without_calib_raises():
    with pytest.raises(ValueError, match="calib"):
        adapters.inject(_model(), ShiraConfig(mask="snip", target_modules=["lin0"], r=1))


def test_merge_twice_raises():
    m = _model()
    adapters.inject(m, ShiraConfig(r=1, target_modules=["lin0"]))
    adapters.merge(m)
    with pytest.raises(ValueError, match="already merged"):
        adapters.merge(m)


def test_switch_command_smoke(tmp_path, capsys):
    import argparse

    from leantrain.commands import switch as switch_cmd

    parser = argparse.ArgumentParser()
    switch_cmd.register(parser.add_subparsers())
    out = tmp_path / "switch.json"
    args = parser.parse_args(["switch", "--layers", "2", "--dim", "16", "--rank", "1", "--num-adapters", "2",
                              "--rounds", "1", "--json", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["bit_exact_restore"] and result["switches"] == 2 and result["layers_adapted"] == 2
    assert "bit-exact" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--rounds"):
        args.rounds = 0
        switch_cmd.run(args)


# ---- rapid switching: originals cached across switches, guarded by the weight's version counter --------------------
def _two_adapters() -> MLP:
    m = _model()
    adapters.inject(m, ShiraConfig(r=3, target_modules=["lin0"], seed=1, init_weights=False), name="a")
    adapters.inject(m, ShiraConfig(r=3, target_modules=["lin0"], seed=2, init_weights=False), name="b")
    return m


def test_repeated_switches_and_fusions_restore_bit_exactly():
    m = _two_adapters()
    w0 = m.lin0.base_layer.weight.detach().clone()
    want = {n: w0 + m.lin0.delta_weight(n) for n in ("a", "b")}
    for names in ["a", "b", "a", ["a", "b"], "b", ["b", "a"], "a", "a"]:  # overlapping masks, cached originals
        switch(m, names)
        if isinstance(names, str):
            torch.testing.assert_close(m.lin0.base_layer.weight, want[names], atol=1e-6, rtol=0)
        adapters.unmerge(m)
        assert torch.equal(m.lin0.base_layer.weight, w0), names
    assert m.lin0.adapters["a"].orig_cache is not None  # the last switch left a's originals for the next one


def test_write_between_switches_is_picked_up_not_overwritten():
    """A write to the base weight while nothing is merged (e.g. a base update) invalidates the cached originals:
    the next merge must add the delta to the *new* values and unmerge must give them back."""
    m = _two_adapters()
    switch(m, "a")
    adapters.unmerge(m)
    idx = m.lin0.adapters["a"].long_flat()
    with torch.no_grad():
        m.lin0.base_layer.weight.view(-1)[idx] += 0.5  # every entry the cached originals cover
    w1 = m.lin0.base_layer.weight.detach().clone()
    switch(m, "a")
    torch.testing.assert_close(m.lin0.base_layer.weight, w1 + m.lin0.delta_weight("a"), atol=1e-6, rtol=0)
    adapters.unmerge(m)
    assert torch.equal(m.lin0.base_layer.weight, w1)


@pytest.mark.parametrize("write", [
    lambda w: w.add_(1.0),  # an optimizer-style in-place update
    lambda w: w.copy_(torch.zeros_like(w)),  # load_state_dict-style copy
])
def test_foreign_write_while_merged_is_refused_in_one_line(write):
    m = _two_adapters()
    switch(m, "a")
    with torch.no_grad():
        write(m.lin0.base_layer.weight)
    with pytest.raises(RuntimeError, match=r"SHiRA layer 'lin0': cannot unmerge adapter 'a': its base weight was "
                                           r"written by something else while adapter\(s\) \['a'\] were merged"):
        adapters.unmerge(m)
    with pytest.raises(RuntimeError, match="cannot merge adapter 'b'"):
        adapters.merge(m, "b")
