"""Smoke test of benchmarks/fusion_text.py on the random "tiny" BERT and a handful of sentences (a few seconds).

Checks the result structure and that "fused" really is both adapters folded into the base weights: the fused
accuracy equals an independent evaluation with W + ΔW_A + ΔW_B written into a clean copy of the encoder, the
merged weights equal that sum, fusion changes the logits, and unmerge restores the base.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from leantrain import adapters
from leantrain.config import TrainConfig
from leantrain.reproduce import fusion as ft  # the fusion experiment (benchmarks/fusion_text.py runs it)


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion_text")
    words = ["great", "awful", "fine", "dull", "bright", "sad", "warm", "cold"]
    a = _write(folder / "a.jsonl", [(f"the {w} movie number {i}", "pos" if k % 2 == 0 else "neg")
                                    for i in range(2) for k, w in enumerate(words)])
    b = _write(folder / "b.jsonl", [(f"verse {i} speaks of {w} things", ["law", "psalm", "gospel"][k % 3])
                                    for i in range(2) for k, w in enumerate(words)])
    cfg = TrainConfig(model="tiny", train_size=None, val_size=None, max_length=16, batch_size=4, steps=3,
                      progress=False, lr=5e-2)  # a large lr so three steps move the adapters visibly
    base, tasks = ft.build_tasks(cfg, [a, b])
    return cfg, [a, b], base, tasks


def _dense_delta(layer, name: str) -> torch.Tensor:
    """ΔW from the adapter's own tensors, by the method's formula (not via merge)."""
    p = layer.adapters[name]
    if hasattr(p, "shira_weight"):
        delta = torch.zeros(p.shape[0] * p.shape[1])
        delta[p.flat.long()] = p.shira_weight.detach() * p.scaling
        return delta.view(p.shape)
    return p.scaling * (p.lora_B.detach() @ p.lora_A.detach())


@pytest.mark.parametrize("label", ["shira", "lora"])
def test_fused_is_a_real_merge_of_both_adapters(setup, label):
    cfg, _, base, tasks = setup
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    encoder = ft.train_adapters(label, base, tasks, cfg)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_state.items())  # the base copy is untouched
    assert adapters.adapter_names(encoder) == ["A", "B"]

    # Independent fused encoder: a clean copy of the base with W + ΔW_A + ΔW_B written in, no adapter code.
    manual = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in adapters.adapter_layers(encoder):
            manual.get_submodule(name).weight += _dense_delta(layer, "A") + _dense_delta(layer, "B")

    model = tasks[0].model
    model.eval()
    batch = next(tasks[0].val_batches.in_order(64))
    with torch.no_grad():
        adapters.set_active(encoder, ["A"])
        alone = model(batch["input_ids"], batch["attention_mask"])
        adapters.set_active(encoder, ["A", "B"])
        adapters.merge(encoder, ["A", "B"])
        fused = model(batch["input_ids"], batch["attention_mask"])
        for name, layer in adapters.adapter_layers(encoder):
            torch.testing.assert_close(layer.base_layer.weight, manual.get_submodule(name).weight, rtol=0, atol=1e-6)
        adapters.unmerge(encoder)
    assert (fused - alone).abs().max() > 1e-4  # adapter B really changes task A's output when fused

    result = ft.fusion_scores(encoder, tasks)
    for name, layer in adapters.adapter_layers(encoder):
        if label == "shira":
            assert torch.equal(layer.base_layer.weight, base.get_submodule(name).weight)  # bit-exact restore
        else:
            torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(name).weight, rtol=0, atol=1e-6)
    if label == "shira":
        assert result["restored_exact"] is True and result["restore_max_error"] == 0.0
    else:
        assert result["restore_max_error"] < 1e-6
    assert result["fused_weight_change"] > 1e-4
    assert result["concept_loss"] == pytest.approx([a - f for a, f in zip(result["alone"], result["fused"])])

    # The benchmark's fused accuracy == accuracy of each task (trained head) on the manually fused clean encoder.
    try:
        for task in tasks:
            task.model.encoder = manual
        assert [t.evaluate()["accuracy"] for t in tasks] == result["fused"]
    finally:
        for task in tasks:
            task.model.encoder = encoder


def test_run_seed_structure_and_fused_accuracy(setup):
    cfg, data, base, _ = setup
    res = ft.run_seed(replace(cfg, seed=0), data, ["shira", "lora"])
    assert res["seed"] == 0 and len(res["head_only"]) == 2
    assert set(res["methods"]) == {"shira", "lora"}
    sizes = {label: m["trainable_per_adapter"] for label, m in res["methods"].items()}
    # equal size by construction: K = r(out+in) entries vs r(out+in) LoRA parameters, 12 linears of the tiny BERT
    assert sizes["shira"] == sizes["lora"] == sum(cfg.rank * (l.in_features + l.out_features)
                                                  for _, l in _linears(base))
    for m in res["methods"].values():
        for key in ("alone", "fused", "concept_loss"):
            assert len(m[key]) == 2
        assert all(0.0 <= x <= 1.0 for x in m["alone"] + m["fused"] + res["head_only"])
        assert m["concept_loss"] == pytest.approx([a - f for a, f in zip(m["alone"], m["fused"])])
        assert m["fused_weight_change"] > 0
    assert res["methods"]["shira"]["restored_exact"] is True
    assert 0.0 <= res["methods"]["shira"]["mask_overlap"] <= 1.0
    assert res["methods"]["lora"]["mask_overlap"] is None
    rows = ft.summarise([res], ["shira", "lora"], data)
    assert [r["method"] for r in rows] == ["shira", "lora"]
    assert "| shira |" in ft.table(rows, data)


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
