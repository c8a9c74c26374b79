"""Differential tests against PEFT, one table for every adapter type (LoRA family, VeRA, MiSS, SHiRA): the same
adapter weights give the same outputs, in both file directions, and the same merged weights.

Direction 1: leantrain injects + perturbs, saves; ``peft.PeftModel.from_pretrained`` loads → logits equal.
Direction 2: PEFT builds the adapter with random weights (init_lora_weights=False etc.) and saves; leantrain
loads → logits equal. Tolerance 1e-5 (fp32; both compute the same formula in a different association order).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig, VeraConfig
from leantrain.adapters.inject import trainable_adapter_parameters
from leantrain.adapters.miss import MissConfig
from leantrain.adapters.shira import ShiraConfig

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.peer


class Net(nn.Module):
    """Embedding -> two Linear of different sizes -> head ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lin0, self.lin1 = nn.Linear(12, 24), nn.Linear(24, 16)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin1(torch.relu(self.lin0(self.emb(x)))))
        return self.classifier(h).mean(1)


# (id, leantrain config, equivalent PEFT config)
TEST_CASES = [
    (
        "LoRA",
        LoraConfig(r=3, alpha=5, target_modules=["lin0", "lin1"]),
        lambda: peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lin0", "lin1"], init_lora_weights=False),
    ),
    (
        "LoRA embedding",
        LoraConfig(r=2, alpha=4, target_modules=["emb", "lin1"]),
        lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "lin1"], init_lora_weights=False),
    ),
    (
        "rsLoRA",
        LoraConfig(r=4, alpha=6, target_modules=["lin0"], use_rslora=True),
        lambda: peft.LoraConfig(
            r=4, lora_alpha=6, target_modules=["lin0"], use_rslora=True, init_lora_weights=False
        ),
    ),
    (
        "DoRA",
        LoraConfig(r=2, alpha=4, target_modules=["lin0", "lin1"], use_dora=True),
        lambda: peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["lin0", "lin1"], use_dora=True, init_lora_weights=False
        ),
    ),
    (
        "LoRA rank_pattern",
        LoraConfig(
            r=2,
            alpha=4,
            target_modules=["lin0", "lin1"],
            rank_pattern={"lin1": 5},
            alpha_pattern={"lin0": 9.0},
        ),
        lambda: peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["lin0", "lin1"],
            rank_pattern={"lin1": 5},
            alpha_pattern={"lin0": 9.0},
            init_lora_weights=False,
        ),
    ),
    (
        "VeRA",
        VeraConfig(r=6, target_modules=["lin0", "lin1"], projection_prng_key=7),
        lambda: peft.VeraConfig(
            r=6, target_modules=["lin0", "lin1"], projection_prng_key=7, init_weights=False
        ),
    ),
    (
        "MiSS",
        MissConfig(r=2, target_modules=["lin0", "lin1"]),
        lambda: peft.MissConfig(r=2, target_modules=["lin0", "lin1"], init_weights=True),
    ),
    (
        "MiSS remainder",  # in=12 and 24 not divisible by 5: the remainder rule
        MissConfig(r=5, target_modules=["lin0", "lin1"]),
        lambda: peft.MissConfig(r=5, target_modules=["lin0", "lin1"], init_weights=True),
    ),
    (
        "MiSS bat",
        MissConfig(r=2, variant="bat", target_modules=["lin0", "lin1"]),
        lambda: peft.MissConfig(r=2, target_modules=["lin0", "lin1"], init_weights="bat"),
    ),
    (
        "MiSS mini",
        MissConfig(r=2, variant="mini", mini_r=4, target_modules=["lin0", "lin1"]),
        lambda: peft.MissConfig(r=2, target_modules=["lin0", "lin1"], init_weights="mini", mini_r=4),
    ),
    (
        "SHiRA",
        ShiraConfig(r=2, target_modules=["lin0", "lin1"]),
        lambda: peft.ShiraConfig(r=2, target_modules=["lin0", "lin1"], init_weights=False, random_seed=7),
    ),
]
IDS = [c[0] for c in TEST_CASES]


@pytest.fixture(scope="module")
def base_and_inputs():
    torch.manual_seed(0)
    return Net().eval(), torch.randint(0, 30, (4, 7))


def randomize(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in trainable_adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_leantrain_file_loads_in_peft(case, base_and_inputs, tmp_path):
    _, config, _ = case
    base, x = base_and_inputs
    model = copy.deepcopy(base)
    adapters.inject(model, copy.deepcopy(config))
    randomize(model)
    ours = model(x)
    adapters.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert (ours - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(theirs(x), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_peft_file_loads_in_leantrain(case, base_and_inputs, tmp_path):
    _, _, peft_config = case
    base, x = base_and_inputs
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config()).eval()
    with torch.no_grad():  # some inits are zero (MiSS) or ones (VeRA's λ_b): make every adapter tensor distinct
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    expected = theirs(x)
    theirs.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    adapters.load(model, tmp_path)
    assert (expected - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    theirs.merge_adapter()  # merged weights agree too
    adapters.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_key_names_and_config_fields(base_and_inputs, tmp_path):
    """Spec §7: PEFT key layout, DoRA magnitude without '.weight', compact target list."""
    from safetensors.torch import load_file

    base, _ = base_and_inputs
    model = copy.deepcopy(base)
    adapters.inject(model, LoraConfig(r=2, alpha=4, target_modules="all-linear", use_dora=True))
    adapters.save(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {
        f"base_model.model.{m}.{k}"
        for m in ("lin0", "lin1")
        for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["lin0", "lin1"]
    assert config["lora_alpha"] == 4 and config["use_dora"] is True and config["r"] == 2


def test_merged_outputs_match_peft_merge(base_and_inputs, tmp_path):
    """merge_and_unload in PEFT and merge in leantrain give the same weights (DoRA: the trickiest merge)."""
    base, _x = base_and_inputs
    model = copy.deepcopy(base)
    adapters.inject(model, LoraConfig(r=2, alpha=4, target_modules=["lin0", "lin1"], use_dora=True))
    randomize(model)
    adapters.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).merge_and_unload()
    adapters.merge(model)
    torch.testing.assert_close(model.lin0.base_layer.weight, theirs.lin0.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.lin1.base_layer.weight, theirs.lin1.weight, atol=1e-6, rtol=1e-6)


def test_loraplus_groups_match_peft(base_and_inputs):
    """LoRA+: the parameters PEFT puts in its high-lr group are exactly ours (B matrices + 1-D magnitudes)."""
    from peft.optimizers import create_loraplus_optimizer

    from leantrain.adapters.methods import loraplus_groups

    base, _ = base_and_inputs
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["lin0", "lin1"], use_dora=True)
    )
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    their_fast = sorted(tuple(p.shape) for g in opt.param_groups if g["lr"] == 16e-3 for p in g["params"])
    model = copy.deepcopy(base)
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0", "lin1"], use_dora=True))
    groups = loraplus_groups(trainable_adapter_parameters(model), lr=1e-3, ratio=16)
    our_fast = sorted(tuple(p.shape) for g in groups if g.get("lr") == 16e-3 for p in g["params"])
    assert our_fast == their_fast
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"] == "lora_B_1d")


def test_pissa_converted_file_loads_in_peft_on_original_base(base_and_inputs, tmp_path):
    base, x = base_and_inputs
    model = copy.deepcopy(base)
    adapters.inject(model, LoraConfig(r=2, alpha=4, target_modules=["lin0", "lin1"], init="pissa"))
    randomize(model)
    expected = model(x)
    adapters.save(model, tmp_path, pissa_to_lora=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.relu(self.conv0(x)))


def test_conv2d_lora_both_directions(tmp_path):
    torch.manual_seed(0)
    base, x = ConvNet().eval(), torch.randn(2, 3, 9, 9)
    model = copy.deepcopy(base)
    adapters.inject(model, LoraConfig(r=2, alpha=5, target_modules=["conv0", "conv1"]))
    randomize(model)
    adapters.save(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
    config = peft.LoraConfig(r=3, lora_alpha=4, target_modules=["conv0", "conv1"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    mine = copy.deepcopy(base)
    adapters.load(mine, tmp_path / "theirs")
    assert (theirs(x) - base(x)).abs().max() > 1e-3
    torch.testing.assert_close(mine(x), theirs(x), atol=1e-5, rtol=1e-5)
