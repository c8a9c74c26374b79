"""Adapter files: layout of several adapters, atomic JSON/safetensors contents, and bad files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig, VeraConfig


class MLP(nn.Module):
    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, hidden), nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def test_several_adapters_saved_peft_style_and_reloaded(tmp_path):
    torch.manual_seed(0)
    base = MLP()
    model = copy.deepcopy(base)
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"], init="random"))
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0", "lin1"], init="random"), name="other")
    x = torch.randn(4, 10)
    outs = {}
    for name in ("default", "other"):
        adapters.set_active(model, name)
        outs[name] = model(x)
    assert adapters.save(model, tmp_path) == ["default", "other"]
    assert (tmp_path / "adapter_config.json").is_file() and (
        tmp_path / "other" / "adapter_config.json"
    ).is_file()
    fresh = copy.deepcopy(base)
    adapters.load(fresh, tmp_path)
    adapters.load(fresh, tmp_path / "other", name="other")
    for name in ("default", "other"):
        adapters.set_active(fresh, name)
        torch.testing.assert_close(fresh(x), outs[name], atol=1e-6, rtol=0)


def test_save_single_named_adapter_at_root_and_saved_config(tmp_path):
    model = MLP()
    adapters.inject(model, LoraConfig(r=2, alpha=3, target_modules=["lin0"], use_rslora=True), name="mine")
    assert adapters.save(model, tmp_path, name="mine") == ["mine"]
    config = adapters.saved_config(tmp_path)
    assert config == LoraConfig(r=2, alpha=3.0, target_modules=["lin0"], use_rslora=True)
    assert not list(tmp_path.glob(".*.tmp")), "temp files are renamed into place"


def test_load_trainable_flag(tmp_path):
    model = MLP()
    adapters.inject(model, VeraConfig(r=4, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    fresh = MLP()
    adapters.load(fresh, tmp_path, trainable=True)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == [
        "lin0.adapters.default.lambda_b",
        "lin0.adapters.default.lambda_d",
    ]


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    model = MLP(hidden=20)
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    other = MLP(hidden=16)
    with pytest.raises(
        ValueError, match=r"lin0\.lora_B\.weight: file has \(20, 2\), model expects \(16, 2\)"
    ):
        adapters.load(other, tmp_path)
    assert not list(adapters.adapter_layers(other)), "a failed load leaves no half-made adapter behind"


def test_vera_projection_shape_mismatch(tmp_path):
    model = MLP()
    adapters.inject(model, VeraConfig(r=4, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.vera_A"] = torch.zeros(4, 11)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"base_model.vera_A: file has \(4, 11\), model expects \(4, 10\)"):
        adapters.load(MLP(), tmp_path)


def test_unknown_peft_type(tmp_path):
    model = MLP()
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "ADALORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown adapter peft_type 'ADALORA'; leantrain supports: .*LORA"):
        adapters.load(MLP(), tmp_path)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("bias", "all", r"bias='all' is not supported"),
        ("init_lora_weights", "olora", r"init_lora_weights='olora' is not supported"),
        ("fan_in_fan_out", True, r"fan_in_fan_out=True"),
    ],
)
def test_unsupported_lora_options(tmp_path, key, value, match):
    model = MLP()
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        adapters.load(MLP(), tmp_path)


def test_missing_and_extra_keys(tmp_path):
    model = MLP()
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, path)
    with pytest.raises(KeyError, match=r"lacks 'lin0.lora_B.weight'"):
        adapters.load(MLP(), tmp_path)
    save_file({**tensors, "base_model.model.nothere.weight": torch.zeros(2)}, path)
    with pytest.raises(KeyError, match=r"'base_model.model.nothere.weight' fits no adapter layer"):
        adapters.load(MLP(), tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        adapters.load(MLP(), tmp_path)
    with pytest.raises(ValueError, match="no adapters to save"):
        adapters.save(MLP(), tmp_path)


def test_peft_modules_to_save_tensors_are_loaded(tmp_path):
    """A PEFT file may carry full tensors of plain modules (modules_to_save); they are copied in."""
    model = MLP()
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"]))
    adapters.save(model, tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.lin1.weight"] = torch.full((2, 20), 0.5)
    save_file(tensors, path)
    fresh = MLP()
    adapters.load(fresh, tmp_path)
    assert torch.equal(fresh.lin1.weight, torch.full((2, 20), 0.5))


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_converted_to_plain_lora_works_on_original_base(tmp_path, rslora):
    """Spec §4: ΔW = BA - B0A0 = [B | -B0][A ; A0]; the converted file is a rank-2r LoRA on the original W."""
    torch.manual_seed(0)
    base = MLP()
    model = copy.deepcopy(base)
    adapters.inject(
        model, LoraConfig(r=2, alpha=3, target_modules=["lin0", "lin1"], init="pissa", use_rslora=rslora)
    )
    with torch.no_grad():  # "training"
        for layer in (model.lin0, model.lin1):
            layer.adapters["default"].lora_A.add_(0.2 * torch.randn_like(layer.adapters["default"].lora_A))
    x = torch.randn(4, 10)
    y = model(x)
    adapters.save(model, tmp_path, pissa_to_lora=True)
    config = adapters.saved_config(tmp_path)
    assert config.r == 4 and config.init == "default"
    fresh = copy.deepcopy(base)
    adapters.load(fresh, tmp_path)
    torch.testing.assert_close(fresh.lin0.base_layer.weight, base.lin0.weight)  # no residual applied
    torch.testing.assert_close(fresh(x), y, atol=1e-5, rtol=1e-5)
