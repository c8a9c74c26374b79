"""MiSS / BAT: the spec's numeric checks, zero init, merge/unmerge, save/load, training, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters.miss import MissConfig, MissLinear, bat_delta, bat_restore, miss_delta, shard_sum


def _linear(out_f: int, in_f: int, zero: bool = False, bias: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    if zero:
        with torch.no_grad():
            m[0].weight.zero_()
    return m


D = torch.tensor([[0.0, 1, 2, 3], [4, 5, 6, 7]])


def test_spec_check_2_divisible():
    m = _linear(4, 6, zero=True)
    adapters.inject(m, MissConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        m[0].adapters["default"].miss_block.copy_(D)
    x = torch.ones(6)
    assert m(x).tolist() == [12.0, 18.0, 24.0, 30.0]
    delta = m[0].delta_weight("default")
    assert torch.equal(delta, torch.cat([D.T, D.T, D.T], dim=1))
    assert torch.equal(delta @ x, m(x))


def test_spec_check_3_remainder():
    m = _linear(4, 5, zero=True)
    adapters.inject(m, MissConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        m[0].adapters["default"].miss_block.copy_(D)
    x = torch.ones(5)
    assert m(x).tolist() == [8.0, 13.0, 18.0, 23.0]
    adapters.merge(m)
    assert m[0].base_layer.weight[:, 4].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert m(x).tolist() == [8.0, 13.0, 18.0, 23.0]


def test_shard_sum_and_delta_agree_with_dense():
    g = torch.Generator().manual_seed(1)
    block = torch.randn(3, 7, generator=g)
    x = torch.randn(4, 11, generator=g)
    torch.testing.assert_close(shard_sum(x, 3) @ block, x @ miss_delta(block, 11).T, atol=1e-5, rtol=1e-5)


def test_spec_check_4_bat_round_trip_and_forward():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, generator=g)
    b = 0.1 * torch.randn(4, 2, 2, generator=g)
    merged = w + bat_delta(w, b)
    torch.testing.assert_close(bat_restore(merged, b), w, atol=1e-5, rtol=0)
    # block formula written out by hand: W'_{o,i} = W_{o,i} (I + B_o) + B_o
    want = w.clone()
    for o in range(4):
        for i in range(3):
            blk = w[2 * o:2 * o + 2, 2 * i:2 * i + 2]
            want[2 * o:2 * o + 2, 2 * i:2 * i + 2] = blk @ (torch.eye(2) + b[o]) + b[o]
    torch.testing.assert_close(merged, want, atol=1e-6, rtol=1e-6)
    m = nn.Sequential(nn.Linear(6, 8, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(w)
    adapters.inject(m, MissConfig(r=2, variant="bat", target_modules=["0"]))
    with torch.no_grad():
        m[0].adapters["default"].miss_block.copy_(b)
    x = torch.randn(3, 6, generator=g)
    torch.testing.assert_close(m(x), x @ want.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,mini_r", [("default", 1), ("bat", 1), ("mini", 4)])
def test_zero_init_equals_base_and_param_count(variant, mini_r):
    m = _linear(8, 12, bias=True)
    x = torch.randn(5, 12)
    y0 = m(x)
    adapters.inject(m, MissConfig(r=4, variant=variant, mini_r=mini_r, target_modules=["0"]))
    assert torch.equal(m(x), y0)
    block = m[0].adapters["default"].miss_block
    assert tuple(block.shape) == {"default": (4, 8), "bat": (2, 4, 4), "mini": (4, 4)}[variant]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.adapters.default.miss_block"]


@pytest.mark.parametrize("variant,in_f", [("default", 12), ("default", 10), ("bat", 12), ("mini", 10)])
def test_merge_unmerge_exact(variant, in_f):
    m = _linear(8, in_f, bias=True)
    adapters.inject(m, MissConfig(r=4, variant=variant, mini_r=2, target_modules=["0"]))
    with torch.no_grad():
        m[0].adapters["default"].miss_block.normal_(0, 0.1)
    x = torch.randn(5, in_f)
    y = m(x)
    w0 = m[0].base_layer.weight.detach().clone()
    adapters.merge(m)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    adapters.unmerge(m)
    torch.testing.assert_close(m[0].base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_bat_needs_divisible_dims_error_names_module_and_shape():
    m = _linear(8, 10)
    with pytest.raises(ValueError, match=r"'0'.*8x10"):
        adapters.inject(m, MissConfig(r=4, variant="bat", target_modules=["0"]))


def test_r_larger_than_in_features_raises():
    with pytest.raises(ValueError, match=r"r=16 exceeds in_features=10 of layer '0'"):
        adapters.inject(_linear(8, 10), MissConfig(r=16, target_modules=["0"]))


def test_mini_needs_divisible_out():
    with pytest.raises(ValueError, match="mini_r=3"):
        adapters.inject(_linear(8, 10), MissConfig(r=2, variant="mini", mini_r=3, target_modules=["0"]))


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"variant": "bone"}, {"dropout": 1.0}, {"mini_r": 0}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        MissConfig(**kwargs)


@pytest.mark.parametrize("variant", ["default", "bat", "mini"])
def test_save_load_round_trip(tmp_path, variant):
    m = _linear(8, 12, bias=True)
    adapters.inject(m, MissConfig(r=4, variant=variant, mini_r=2, target_modules=["0"]))
    with torch.no_grad():
        m[0].adapters["default"].miss_block.normal_()
    x = torch.randn(3, 12)
    y = m(x)
    adapters.save(m, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["peft_type"] == "MISS" and body["init_weights"] == {"default": True, "bat": "bat", "mini": "mini"}[variant]
    m2 = _linear(8, 12, bias=True)
    adapters.load(m2, tmp_path)
    assert isinstance(m2[0], MissLinear)
    torch.testing.assert_close(m2(x), y, atol=0, rtol=0)


def test_load_wrong_shape_names_key(tmp_path):
    m = _linear(8, 12)
    adapters.inject(m, MissConfig(r=4, target_modules=["0"]))
    adapters.save(m, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    body["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match=r"miss_block.*\(4, 8\).*\(3, 8\)"):
        adapters.load(_linear(8, 12), tmp_path)


@pytest.mark.parametrize("variant", ["default", "bat"])
def test_training_lowers_loss(variant):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    target = torch.randn(64, 4)
    w0 = m[0].weight.detach().clone()
    adapters.inject(m, MissConfig(r=4, variant=variant, target_modules=["0", "2"]))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    first = None
    for _ in range(40):
        loss = nn.functional.mse_loss(m(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first
    assert torch.equal(m[0].base_layer.weight, w0)
