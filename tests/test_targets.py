"""leantrain.targets: the one target rule (table-driven), and every caller selecting the same layers with it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters.inject import resolve_targets as inject_targets
from leantrain.adapters.methods import parse_targets as adapter_targets
from leantrain.lowrank.convert import resolve_targets as lowrank_targets
from leantrain.memory.estimate import select_targets as estimate_targets
from leantrain.memory.modelspec import from_module
from leantrain.optim.gradnorm import resolve_linear_targets as gradnorm_targets
from leantrain.quant.convert import target_linear_names as quant_targets
from leantrain.targets import is_head, of_kind, resolve, select, set_submodule

NAMES = [
    "encoder.layer.0.attention.query",
    "encoder.layer.0.attention.value",
    "encoder.layer.0.attention.output.dense",
    "encoder.layer.1.attention.query",
    "pooler.dense",
    "classifier",
    "score.dense",
]
HEADS = {"classifier", "score.dense"}
BODY = [n for n in NAMES if n not in HEADS]


def pick(targets, **kwargs) -> list[str]:
    return select(((n, None) for n in NAMES), targets, owner="Toy", **kwargs)


@pytest.mark.parametrize("name, head", [
    ("classifier", True), ("lm_head", True), ("score", True), ("classifier.dense", True),
    ("model.score.out_proj", True), ("encoder.classifier_hidden", False), ("scores", False), ("", False),
    ("encoder.layer.0.attention.query", False),
])
def test_is_head_checks_every_name_component(name, head):
    assert is_head(name) is head


@pytest.mark.parametrize("targets, kwargs, expected", [
    ("all-linear", {}, BODY),  # heads are left out of all-linear ...
    (" all-linear ", {}, BODY),
    (r"re:.*dense", {}, ["encoder.layer.0.attention.output.dense", "pooler.dense"]),  # ... and of regexes
    (r"re:query", {}, []),  # full match, not search: raises below
    ("query", {}, ["encoder.layer.0.attention.query", "encoder.layer.1.attention.query"]),
    ("attention.query", {}, ["encoder.layer.0.attention.query", "encoder.layer.1.attention.query"]),
    ("layer.0.attention.query, value", {}, ["encoder.layer.0.attention.query", "encoder.layer.0.attention.value"]),
    (["value", "query"], {}, ["encoder.layer.0.attention.query", "encoder.layer.0.attention.value",
                              "encoder.layer.1.attention.query"]),  # model order, not entry order
    ("query,,", {}, ["encoder.layer.0.attention.query", "encoder.layer.1.attention.query"]),
    ("dense", {}, ["encoder.layer.0.attention.output.dense", "pooler.dense", "score.dense"]),  # named: head kept
    ("classifier", {}, ["classifier"]),
    ("all-linear", {"exclude": ["dense"]}, [*BODY[:2], BODY[3], "classifier"]),  # exclude replaces head rule
    ("all-linear", {"exclude": []}, NAMES),
    ("all-linear", {"exclude": r"re:encoder\..*"}, ["pooler.dense", "classifier", "score.dense"]),
    ("dense", {"heads": "never"}, ["encoder.layer.0.attention.output.dense", "pooler.dense"]),
    ("all-linear", {"linear": lambda m: False, "exclude": []}, []),
])
def test_selection_rule(targets, kwargs, expected):
    if not expected:
        with pytest.raises(ValueError, match=r"selects no module of Toy"):
            pick(targets, **kwargs)
        return
    assert pick(targets, **kwargs) == expected


@pytest.mark.parametrize("targets, kwargs, error, match", [
    ("qurey", {}, ValueError, r"^target 'qurey' matches no module of Toy; did you mean 'query'\?$"),
    ("query,nothing_like_it", {}, ValueError, r"^target 'nothing_like_it' matches no module of Toy$"),
    ("uery", {}, ValueError, r"^target 'uery' matches no module of Toy; did you mean 'query'\?$"),  # not a suffix
    ("0.attention", {}, ValueError, r"'0.attention' matches no module"),  # no such module among the toy names
    ("classifier", {"heads": "never"}, ValueError, r"'classifier' matches no module \(heads excluded\) of Toy"),
    ("re:(", {}, ValueError, r"^targets regex '\(' is invalid"),
    (" , ", {}, ValueError, r"names no module"),
    ([], {}, ValueError, r"names no module"),
    (["query", 3], {}, TypeError, r"list of strings"),
    ("query", {"heads": "always"}, ValueError, r"heads='always'"),
])
def test_bad_targets_raise_one_line_naming_the_value(targets, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        pick(targets, **kwargs)
    assert "\n" not in str(info.value)


def test_kind_filters_candidates_and_linear_filters_all_linear():
    named = [("a", nn.Linear(2, 2)), ("b", nn.Conv2d(2, 2, 1)), ("c", nn.ReLU()), ("d", nn.Linear(2, 2))]
    dense = of_kind(nn.Linear, nn.Conv2d)
    assert select(named, "all-linear", owner="M", kind=dense, linear=of_kind(nn.Linear)) == ["a", "d"]
    assert select(named, "all-linear", owner="M", kind=dense) == ["a", "b", "d"]
    assert select(named, "re:.*", owner="M", kind=dense) == ["a", "b", "d"]
    with pytest.raises(ValueError, match="'c' matches no nn.Linear of M"):
        select(named, "c", owner="M", kind=dense, what="nn.Linear")
    mha = nn.MultiheadAttention(4, 1)  # out_proj is a Linear subclass its parent uses directly
    assert of_kind(nn.Linear)(mha.out_proj) and not of_kind(nn.Linear, exact=True)(mha.out_proj)


def test_set_submodule_replaces_nested_and_top_level_modules():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    set_submodule(model, "0.0", nn.Identity())
    set_submodule(model, "1", nn.Tanh())
    assert isinstance(model[0][0], nn.Identity) and isinstance(model[1], nn.Tanh)


# ---------------------------------------------------------------------------------------------- the callers
class Attention(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.output = nn.ModuleDict({"dense": nn.Linear(h, h), "LayerNorm": nn.LayerNorm(h)})


class Layer(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.attention = Attention(h)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(h, 2 * h)})
        self.output = nn.ModuleDict({"dense": nn.Linear(2 * h, h)})


class TinyBert(nn.Module):
    """BERT-shaped: embeddings, two encoder layers, a pooler and a ``classifier`` head."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(16, h)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([Layer(h), Layer(h)])})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(h, h)})
        self.classifier = nn.Linear(h, 2)


CALLERS = {
    "adapters.inject": lambda m, t: inject_targets(m, adapter_targets(t)),  # TrainConfig.targets -> LoRA config
    "lowrank.convert": lowrank_targets,
    "quant.convert": quant_targets,
    "optim.gradnorm": gradnorm_targets,
    "memory.modelspec": lambda m, t: from_module(m).target_modules(t),
    "memory.estimate": lambda m, t: [p.module for p in estimate_targets(from_module(m), t)],
}


@pytest.mark.parametrize("targets, count", [
    ("all-linear", 13), ("query,value", 4), ("attention.output.dense", 2), ("dense", 7), ("1.attention.key", 1),
    (r"re:encoder\.layer\.0\..*\.(query|key|value|dense)", 6), (r"re:.*\.(query|key)", 4),
    ("re:classifier|pooler.dense", 1),
])
def test_every_caller_selects_the_same_modules(targets, count):
    """Same names for every caller as long as the targets name Linear layers only (adapters may also wrap other
    kinds, so their names and regexes see every module: see the next test)."""
    selections = {where: select_(TinyBert(), targets) for where, select_ in CALLERS.items()}
    expected = resolve(TinyBert(), targets, kind=of_kind(nn.Linear))
    assert len(expected) == count
    assert selections == dict.fromkeys(CALLERS, expected)
    assert "classifier" not in expected


def test_adapters_see_every_module_kind():
    with pytest.raises(TypeError, match="cannot wrap module 'encoder.layer.0.attention'"):
        adapters.inject(TinyBert(), adapters.LoraConfig(r=2, target_modules=r"re:encoder\.layer\.0\..*"))
    assert lowrank_targets(TinyBert(), r"re:encoder\.layer\.0\..*") == CALLERS["optim.gradnorm"](
        TinyBert(), r"re:encoder\.layer\.0\..*")


def test_callers_that_keep_the_head_dense_refuse_to_name_it():
    """Named explicitly, the head is selected where it may change (adapters, DLRT, the estimator), and is an
    unmatched name where it must stay a plain trainable Linear (quantization, GradNormLoRP)."""
    for where in ("adapters.inject", "lowrank.convert", "memory.modelspec"):
        assert CALLERS[where](TinyBert(), "classifier") == ["classifier"], where
    for where in ("quant.convert", "optim.gradnorm"):
        with pytest.raises(ValueError, match=r"'classifier' matches no nn.Linear \(heads excluded\) of TinyBert"):
            CALLERS[where](TinyBert(), "classifier")


def test_every_caller_names_an_unmatched_entry():
    for where, select_ in CALLERS.items():
        if where == "memory.estimate":
            continue  # the estimator only checks that something is selected (see test_memory_estimate)
        with pytest.raises(ValueError, match=r"'qurey' matches no"):
            select_(TinyBert(), "query,qurey")


def test_converted_layers_are_the_selected_ones():
    from leantrain.lowrank.convert import convert_to_lowrank
    from leantrain.lowrank.layers import LowRankMixin
    from leantrain.quant.convert import quantize
    from leantrain.quant.linear import QuantLinear

    model = TinyBert()
    assert convert_to_lowrank(model, "query", rank=2) == lowrank_targets(TinyBert(), "query")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LowRankMixin)) == [
        "encoder.layer.0.attention.query", "encoder.layer.1.attention.query"]
    model = TinyBert()
    with torch.no_grad():
        names = quantize(model, bits=8, targets="all-linear", block_size=8)
    assert names == [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert isinstance(model.classifier, nn.Linear)
