"""Method-agnostic adapter checks over a flat TEST_CASES table (PEFT's tests/test_custom_models.py style).

Every row: (test id, model name, config class, config kwargs). Each check is a short function run per row:
output equals the base at init, merge → unmerge restores the weights, merged output equals unmerged output,
merging twice is refused, save → load gives identical outputs, disable gives the base output, and a short
training run lowers the loss while the base stays frozen.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig, VeraConfig
from leantrain.adapters.inject import trainable_adapter_parameters


class MLP(nn.Module):
    """PEFT's test MLP: Linear(10,20) -> ReLU -> Linear(20,2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))

    @staticmethod
    def inputs() -> torch.Tensor:
        return torch.randn(6, 10)


class EmbMLP(nn.Module):
    """Embedding(50, 10) -> Linear(10, 20) -> ReLU -> Linear(20, 2), mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 10)
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(self.emb(x)))).mean(1)

    @staticmethod
    def inputs() -> torch.Tensor:
        return torch.randint(0, 50, (6, 5))


class Deep(nn.Module):
    """Layers of different sizes (VeRA slices its shared matrices) and a head named ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 16)
        )
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x))

    @staticmethod
    def inputs() -> torch.Tensor:
        return torch.randn(6, 12)


class ConvNet(nn.Module):
    """Conv2d(3, 8, 3, padding=1) -> ReLU -> Conv2d(8, 6, 3, stride=2) -> mean -> Linear(6, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, stride=2)
        self.lin = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv1(torch.relu(self.conv0(x))).mean((2, 3)))

    @staticmethod
    def inputs() -> torch.Tensor:
        return torch.randn(4, 3, 9, 9)


MODELS = {"MLP": MLP, "EmbMLP": EmbMLP, "Deep": Deep, "ConvNet": ConvNet}

TEST_CASES = [
    ("LoRA lin0", "MLP", LoraConfig, {"r": 2, "alpha": 4, "target_modules": ["lin0"]}),
    ("LoRA both", "MLP", LoraConfig, {"r": 2, "target_modules": ["lin0", "lin1"]}),
    ("LoRA gaussian", "MLP", LoraConfig, {"r": 4, "target_modules": ["lin0"], "init": "gaussian"}),
    ("LoRA dropout", "MLP", LoraConfig, {"r": 2, "target_modules": ["lin0"], "dropout": 0.2}),
    ("LoRA all-linear", "Deep", LoraConfig, {"r": 3, "target_modules": "all-linear"}),
    ("LoRA regex", "Deep", LoraConfig, {"r": 3, "target_modules": r"re:blocks\.[02]"}),
    (
        "LoRA rank_pattern",
        "Deep",
        LoraConfig,
        {
            "r": 2,
            "target_modules": "all-linear",
            "rank_pattern": {r"blocks\.2": 5},
            "alpha_pattern": {"0": 7.0},
        },
    ),
    ("LoRA embedding", "EmbMLP", LoraConfig, {"r": 3, "target_modules": ["emb", "lin0"]}),
    ("LoRA conv2d", "ConvNet", LoraConfig, {"r": 2, "target_modules": ["conv0", "conv1"]}),
    ("rsLoRA", "MLP", LoraConfig, {"r": 4, "alpha": 8, "target_modules": ["lin0"], "use_rslora": True}),
    ("DoRA", "MLP", LoraConfig, {"r": 2, "target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("DoRA all-linear", "Deep", LoraConfig, {"r": 3, "target_modules": "all-linear", "use_dora": True}),
    ("PiSSA", "MLP", LoraConfig, {"r": 2, "target_modules": ["lin0"], "init": "pissa"}),
    ("PiSSA fast", "Deep", LoraConfig, {"r": 3, "target_modules": "all-linear", "init": "pissa_fast"}),
    ("VeRA", "MLP", VeraConfig, {"r": 4, "target_modules": ["lin0", "lin1"]}),
    (
        "VeRA all-linear",
        "Deep",
        VeraConfig,
        {"r": 8, "target_modules": "all-linear", "projection_prng_key": 3},
    ),
]
IDS = [case[0] for case in TEST_CASES]


def build(model_name: str, config_cls: type, kwargs: dict) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base copy, adapted model, inputs); fixed seeds so every check sees the same numbers."""
    torch.manual_seed(0)
    base = MODELS[model_name]()
    x = MODELS[model_name].inputs()
    model = copy.deepcopy(base)
    adapters.inject(model, config_cls(**kwargs))
    return base.eval(), model.eval(), x


def perturb(model: nn.Module) -> None:
    """Move every adapter parameter away from its init so ΔW is non-zero."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in trainable_adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "adapters." not in n}


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_output_equals_base_at_init(case):
    _, model_name, cls, kwargs = case
    base, model, x = build(model_name, cls, kwargs)
    torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_merge_unmerge_round_trip(case):
    _, model_name, cls, kwargs = case
    base, model, x = build(model_name, cls, kwargs)
    perturb(model)
    before = base_weights(model)
    y = model(x)
    assert (y - base(x)).abs().max() > 1e-3, "perturbed adapter should change the output"
    assert adapters.merge(model) == ["default"]
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    changed = base_weights(model)
    assert any((changed[n] - before[n]).abs().max() > 1e-4 for n in before), (
        "merge must change the base weights"
    )
    with pytest.raises(ValueError, match="already merged"):
        adapters.merge(model)
    assert adapters.unmerge(model) == ["default"]
    for name, value in base_weights(model).items():
        torch.testing.assert_close(value, before[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", TEST_CASES, ids=IDS)
def test_save_load_identical(case, tmp_path):
    _, model_name, cls, kwargs = case
    base, model, x = build(model_name, cls, kwargs)
    perturb(model)
    y = model(x)
    adapters.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    fresh = copy.deepcopy(base)
    adapters.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), y, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters()), "a loaded adapter is frozen by default"


@pytest.mark.parametrize(
    "case",
    [c for c in TEST_CASES if c[3].get("init", "").find("pissa") < 0],
    ids=[c[0] for c in TEST_CASES if c[3].get("init", "").find("pissa") < 0],
)
def test_disable_gives_base_output(case):
    _, model_name, cls, kwargs = case
    base, model, x = build(model_name, cls, kwargs)
    perturb(model)
    y = model(x)
    for merged in (False, True):
        if merged:
            adapters.merge(model)
        with adapters.disable(model):
            torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


# one row per method x layer type keeps the default run short
TRAIN_IDS = [
    "LoRA lin0",
    "LoRA embedding",
    "LoRA conv2d",
    "rsLoRA",
    "DoRA",
    "PiSSA",
    "VeRA",
    "VeRA all-linear",
]
TRAIN_CASES = [c for c in TEST_CASES if c[0] in TRAIN_IDS]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_training_lowers_loss_and_freezes_base(case):
    _, model_name, cls, kwargs = case
    base, model, x = build(model_name, cls, kwargs)
    model.train()
    frozen = base_weights(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in names), names
    target = torch.randn_like(base(x)).detach()
    opt = torch.optim.Adam(trainable, lr=5e-2 if cls is VeraConfig else 1e-2)
    losses = []
    for _ in range(12):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, value in base_weights(model).items():
        assert torch.equal(value, frozen[name]), f"{name} changed although frozen"


# ---- numeric checks straight from the spec (§9) ------------------------------------------------------------
@pytest.mark.parametrize("rslora, expected", [(False, 8.0), (True, 2 * 4 / 2**0.5 * 2)])
def test_lora_scaling_hand_computed(rslora, expected):
    """in=4, out=3, r=2, alpha=4, A=1, B=0.5, W=0, x=1: BAx = 4, y = s·4, s = 2 (LoRA) or 4/√2 (rsLoRA)."""
    lin = nn.Linear(4, 3, bias=False)
    nn.init.zeros_(lin.weight)
    model = nn.Sequential(lin)
    adapters.inject(model, LoraConfig(r=2, alpha=4, target_modules=["0"], use_rslora=rslora))
    p = model[0].adapters["default"]
    with torch.no_grad():
        p.lora_A.fill_(1.0)
        p.lora_B.fill_(0.5)
    y = model(torch.ones(4))
    torch.testing.assert_close(y, torch.full((3,), expected), atol=1e-5, rtol=0)


def test_dora_magnitude_starts_at_row_norm():
    torch.manual_seed(0)
    model = MLP()
    w = model.lin0.weight.detach().clone()
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    m = model.lin0.adapters["default"].magnitude
    torch.testing.assert_close(m.detach(), torch.linalg.norm(w, dim=1))


def test_dora_forward_matches_paper_formula():
    """y = (m / ||W + sBA||_row) ⊙ ((W + sBA) x) + b, computed densely here."""
    torch.manual_seed(0)
    model = MLP()
    w, b = model.lin0.weight.detach().clone(), model.lin0.bias.detach().clone()
    adapters.inject(model, LoraConfig(r=2, alpha=6, target_modules=["lin0"], use_dora=True))
    perturb(model)
    p = model.lin0.adapters["default"]
    full = w + 3.0 * p.lora_B @ p.lora_A
    x = torch.randn(5, 10)
    expected = (p.magnitude / torch.linalg.norm(full, dim=1)) * (x @ full.T) + b
    torch.testing.assert_close(model.lin0(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_fast"])
def test_pissa_residual_and_top_singular_values(init):
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    w = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    adapters.inject(model, LoraConfig(r=4, alpha=8, target_modules=["0"], init=init, pissa_niter=8))
    p = model[0].adapters["default"]
    low_rank = p.scaling * p.lora_B @ p.lora_A
    torch.testing.assert_close(model[0].base_layer.weight + low_rank, w, atol=1e-5, rtol=0)
    sigma = torch.linalg.svdvals(w)[:4]
    tol = 1e-4 if init == "pissa" else 2e-2  # randomized SVD is approximate
    torch.testing.assert_close(torch.linalg.svdvals(low_rank)[:4], sigma, atol=tol, rtol=tol)


def test_vera_delta_matches_formula():
    """ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in] with the shared pair sized to the largest layer."""
    torch.manual_seed(0)
    model = Deep()
    adapters.inject(model, VeraConfig(r=8, target_modules="all-linear"))
    perturb(model)
    layer = model.blocks[2]  # 24 -> 16, the shared pair is (8, 24) and (24, 8)
    p = layer.adapters["default"]
    a, b = p.projection.a, p.projection.b
    assert a.shape == (8, 24) and b.shape == (24, 8)
    expected = torch.diag(p.lambda_b) @ b[:16] @ torch.diag(p.lambda_d) @ a[:, :24]
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-6, rtol=1e-6)
    shared = {
        id(m.adapters["default"].projection) for m in (model.blocks[0], model.blocks[2], model.blocks[4])
    }
    assert len(shared) == 1, "all layers share one projection pair"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == (8 + 24) + (8 + 16) + (8 + 16)
