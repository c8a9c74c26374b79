"""LeNet5 / MNIST for DLRT (``leantrain reproduce dlrt-lenet5``): the network and both parameter counts against
the reference's published numbers, the hold-out split, chunked evaluation, and a seconds-long --quick run."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from leantrain.commands import reproduce
from leantrain.lowrank import LowRankConv2d, LowRankLinear, convert_to_lowrank, model_params
from leantrain.lowrank.lenet5 import build_optimizer, evaluate, holdout, lenet5, reference_compression

# (ranks conv1/conv2/fc1, eval params, compression %) from the reference's Lenet_experiment/cross_val_tab_paper.csv
PAPER_PARAMS = [((10, 23, 62), 37445, 91.3), ((9, 16, 28), 20033, 95.3), ((4, 6, 8), 9398, 97.8),
                ((2, 2, 3), 6647, 98.5)]
SHAPES = {"conv1": (20, 25), "conv2": (50, 500), "fc1": (500, 800)}  # (n, m) of each weight as a matrix


def test_lenet5_has_the_reference_430500_weights():
    model = lenet5(0)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert weights == 430_500
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("ranks, paper_params, paper_cr", PAPER_PARAMS)
def test_reference_count_reproduces_the_papers_column_and_full_count_is_r_n_plus_m(ranks, paper_params, paper_cr):
    model = lenet5(0)
    convert_to_lowrank(model, list(SHAPES), rank=dict(zip(SHAPES, ranks)), init="random")
    assert reference_compression(model) == pytest.approx(1 - paper_params / 430_500)
    assert round(100 * reference_compression(model), 1) == paper_cr
    full = sum(r * (n + m) + r * r + n for r, (n, m) in zip(ranks, SHAPES.values())) + 500 * 10 + 10
    assert model_params(model)["params"] == full


def test_dlrt_starts_at_the_reference_rmax_and_keeps_the_output_layer_dense():
    model = lenet5(0)
    opt = build_optimizer(model, 0.09, lr=0.05, momentum=0.0)
    assert opt.ranks() == {"conv1": 10, "conv2": 25, "fc1": 250}
    assert isinstance(model.conv2, LowRankConv2d) and isinstance(model.fc1, LowRankLinear)
    assert type(model.fc2) is nn.Linear
    dense = build_optimizer(lenet5(0), None, lr=0.05, momentum=0.0)
    assert isinstance(dense, torch.optim.SGD) and dense.param_groups[0]["lr"] == 0.05


def test_holdout_is_stratified_disjoint_and_fixed_by_its_seed():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400]).astype(np.uint8)
    train, val = holdout(labels, 100)
    assert np.bincount(labels[val]).tolist() == [10, 20, 30, 40]
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(1000))
    assert np.array_equal(holdout(labels, 100)[1], val) and not np.array_equal(holdout(labels, 100, seed=1)[1], val)
    with pytest.raises(ValueError, match="val_size=1000 must be in"):
        holdout(labels, 1000)


def test_evaluate_in_chunks_equals_one_batch():
    torch.manual_seed(0)
    model = lenet5(1)
    images = torch.randint(0, 256, (23, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (23,), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(images.float().div(255).unsqueeze(1))
    acc = float((logits.argmax(1) == labels.long()).float().mean())
    loss = float(nn.functional.cross_entropy(logits, labels.long()))
    got_acc, got_loss = evaluate(model, images, labels, chunk=5)
    assert got_acc == pytest.approx(acc) and got_loss == pytest.approx(loss, rel=1e-5)
    assert model.training  # restored


def test_quick_run_writes_table_results_and_plots(tmp_path, capsys):
    p = argparse.ArgumentParser(prog="leantrain")
    reproduce.register(p.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        p.parse_args(["reproduce", "--help"])
    assert "dlrt-lenet5" in capsys.readouterr().out
    args = p.parse_args(["reproduce", "dlrt-lenet5", "--quick", "--no-progress", "--out", str(tmp_path / "r"),
                         "--work", str(tmp_path / "w")])
    assert reproduce.run(args) == 0
    folder = tmp_path / "r" / "dlrt-lenet5"
    text = (folder / "README.md").read_text()
    assert "| quantity | paper | ours |" in text and "98.16" in text and "--quick" in text
    results = json.loads((folder / "results.json").read_text())
    assert [r["tau"] for r in results["rows"]] == [None, 0.09, 0.15, 0.3]
    for row in results["rows"]:
        assert {"seed", "accuracy", "compression", "reference_compression", "ranks", "sec_per_epoch"} <= set(row)
        assert row["steps_per_epoch"] == 3 and 0 <= row["accuracy"] <= 1
    assert list(results["rows"][1]["ranks"]) == ["conv1", "conv2", "fc1"]
    for png in ("dlrt-lenet5.png", "dlrt_rank_vs_step.png"):
        assert (folder / png).stat().st_size > 1000
