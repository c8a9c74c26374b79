"""inject(): target selection (names, regex, all-linear, head exclusion), freezing, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig, VeraConfig
from leantrain.adapters.inject import resolve_targets


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.value, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.out(self.query(x) + self.value(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.proj = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.layers[0](x))
        return self.classifier(self.proj(self.layers[1](x)))


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        (["query"], None, ["layers.0.query", "layers.1.query"]),
        (["layers.1.value", "proj"], None, ["layers.1.value", "proj"]),
        (
            "all-linear",
            None,
            [
                "layers.0.query",
                "layers.0.value",
                "layers.0.out",
                "layers.1.query",
                "layers.1.value",
                "layers.1.out",
                "proj",
            ],
        ),
        (
            r"re:layers\.\d\.(query|value)",
            None,
            ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"],
        ),
        (r"re:.*", ["out", "norm"], None),  # containers match the regex -> TypeError, checked below
        (
            "all-linear",
            ["out"],
            ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value", "proj", "classifier"],
        ),
        # an explicit exclude replaces the default head exclusion
        (
            "all-linear",
            r"re:layers\.0\..*",
            ["layers.1.query", "layers.1.value", "layers.1.out", "proj", "classifier"],
        ),
        (["classifier"], None, ["classifier"]),  # explicitly named: the head is not excluded
    ],
)
def test_resolve_targets(targets, exclude, expected):
    if expected is None:
        with pytest.raises(TypeError, match="cannot wrap module"):
            adapters.inject(Net(), LoraConfig(r=2, target_modules=targets, exclude_modules=exclude))
        return
    assert sorted(resolve_targets(Net(), targets, exclude)) == sorted(expected)


def test_inject_freezes_base_and_returns_names():
    model = Net()
    names = adapters.inject(model, LoraConfig(r=2, target_modules=["query"]))
    assert names == ["layers.0.query", "layers.1.query"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"layers.{i}.query.adapters.default.lora_{m}" for i in (0, 1) for m in "AB")
    assert isinstance(model.layers[0].query, adapters.AdapterLayer)
    assert model.layers[0].query.in_features == 8 and model.layers[0].query.weight.shape == (8, 8)


def test_second_adapter_wraps_same_layers_and_newest_trains():
    model = Net()
    adapters.inject(model, LoraConfig(r=2, target_modules=["query"]), name="a")
    adapters.inject(model, LoraConfig(r=3, target_modules=["query", "value"]), name="b")
    assert adapters.adapter_names(model) == ["a", "b"]
    assert list(model.layers[0].query.adapters) == ["a", "b"]
    assert not isinstance(model.layers[0].query.base_layer, adapters.AdapterLayer)
    assert all(".adapters.b." in n for n, p in model.named_parameters() if p.requires_grad)


def test_unknown_target_lists_close_matches():
    with pytest.raises(ValueError, match=r"'qurey' matches no module of Net; did you mean 'query'"):
        adapters.inject(Net(), LoraConfig(r=2, target_modules=["qurey"]))


@pytest.mark.parametrize(
    "config, match",
    [
        (lambda: LoraConfig(r=0, target_modules=["query"]), r"LoraConfig.r=0 must be a positive integer"),
        (lambda: LoraConfig(r=-2, target_modules=["query"]), r"LoraConfig.r=-2"),
        (lambda: LoraConfig(r=2, rank_pattern={"query": 0}), r"rank_pattern\['query'\]=0"),
        (lambda: VeraConfig(r=0), r"VeraConfig.r=0"),
        (lambda: LoraConfig(r=2, init="svd"), r"init='svd'"),
        (lambda: LoraConfig(r=2, dropout=1.0), r"dropout=1.0"),
    ],
)
def test_bad_config_values(config, match):
    with pytest.raises(ValueError, match=match):
        config()


def test_rank_larger_than_layer_names_layer_and_changes_nothing():
    model = Net()
    with pytest.raises(
        ValueError, match=r"PiSSA r=7 exceeds min\(in, out\)=6 of layer 'layers.0.out' \(8->6\)"
    ):
        adapters.inject(model, LoraConfig(r=7, target_modules=["query", "out"], init="pissa"))
    assert not list(adapters.adapter_layers(model)), "a failed inject leaves the model untouched"


def test_non_linear_target_is_type_error():
    with pytest.raises(TypeError, match=r"LORA cannot wrap module 'layers.0.norm' of type LayerNorm"):
        adapters.inject(Net(), LoraConfig(r=2, target_modules=["norm"]))


def test_duplicate_adapter_name_and_bad_name():
    model = Net()
    adapters.inject(model, LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        adapters.inject(model, LoraConfig(r=2, target_modules=["value"]))
    with pytest.raises(ValueError, match="without dots"):
        adapters.inject(model, LoraConfig(r=2, target_modules=["value"]), name="a.b")


def test_mixing_adapter_kinds_on_one_layer_is_refused():
    model = Net()
    adapters.inject(model, LoraConfig(r=2, target_modules=["query"]), name="lora")
    with pytest.raises(TypeError, match="already holds LoraLinear adapters"):
        adapters.inject(model, VeraConfig(r=4, target_modules=["query"]), name="vera")


def test_regex_selecting_nothing_and_invalid_regex():
    with pytest.raises(ValueError, match="selects no module"):
        adapters.inject(Net(), LoraConfig(r=2, target_modules="re:nothing.*"))
    with pytest.raises(ValueError, match="regex"):
        adapters.inject(Net(), LoraConfig(r=2, target_modules="re:(unclosed"))


def test_delete_restores_plain_layers():
    model = Net()
    x = torch.randn(3, 8)
    y = model(x)
    adapters.inject(model, LoraConfig(r=2, target_modules="all-linear", init="random"))
    assert (model(x) - y).abs().max() > 1e-4
    adapters.delete(model, "default")
    assert not list(adapters.adapter_layers(model))
    assert type(model.layers[0].query) is nn.Linear
    torch.testing.assert_close(model(x), y)
    with pytest.raises(KeyError, match="no adapter named 'default'"):
        adapters.delete(model, "default")


def test_tiny_bert_all_linear_skips_head():
    """On the real classifier, all-linear wraps every encoder Linear and leaves ``classifier`` alone."""
    from leantrain.models import build_classifier

    model = build_classifier("tiny", 3)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    names = adapters.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    assert len(names) == n_linear - 1 and "classifier" not in names
    assert type(model.classifier) is nn.Linear
    ids = torch.randint(0, 100, (2, 9))
    assert model(ids, torch.ones_like(ids)).shape == (2, 3)
