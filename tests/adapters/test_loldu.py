"""LoLDU (``--method loldu``, Shi et al. 2024): W = W_res + s P L_r diag(z) U'_r, only z and s train."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain.adapters import inject
from leantrain.adapters.io import load, save
from leantrain.adapters.loldu import LolduConfig, ldu_delta, ldu_factors
from leantrain.cli import main


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7))


def _adapted(r: int = 4, seed: int = 0) -> nn.Module:
    model = _model(seed)
    inject(model, LolduConfig(r=r, alpha=8.0, target_modules=["0", "2"]))
    return model


@pytest.mark.parametrize("shape", [(10, 12), (12, 10), (9, 9)])
def test_full_rank_ldu_reconstructs_the_weight(shape):
    """P L diag(d) U' = W (torch.linalg.lu, fp32) when every component is kept."""
    w = torch.randn(*shape)
    perm, lower, d, upper = ldu_factors(w, min(shape))
    assert torch.allclose(ldu_delta(perm, lower, d, upper, torch.tensor(1.0)), w, atol=1e-5)
    assert torch.equal(torch.diagonal(upper), torch.ones(min(shape)))


def test_residual_plus_adapter_is_the_base_and_the_output_is_unchanged_at_init():
    base, model = _model(), _adapted()
    x = torch.randn(5, 12)
    assert torch.allclose(model(x), base(x), atol=1e-5)
    for i in ("0", "2"):
        layer = model.get_submodule(i)
        total = layer.base_layer.weight + layer.delta_weight("default")
        assert torch.allclose(total, base.get_submodule(i).weight, atol=1e-6)
        assert layer.adapters["default"].scale.item() == pytest.approx(8.0 / 4)


def test_only_z_and_the_scale_train():
    model = _adapted()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{i}.adapters.default.{k}" for i in ("0", "2") for k in ("z", "scale")}
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    frozen.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
    z0 = model.get_submodule("0").adapters["default"].z.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
    state = dict(model.named_buffers())
    state.update(dict(model.named_parameters()))
    assert all(torch.equal(state[n], v) for n, v in frozen.items())
    assert not torch.equal(model.get_submodule("0").adapters["default"].z, z0)


def _train_a_little(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_merge_keeps_the_output_and_unmerge_restores_the_residual():
    """Outputs agree within 1e-5 before/after merge; unmerge gives W_res back within 1e-6 (fp32 add/subtract)."""
    model = _adapted()
    _train_a_little(model)
    x = torch.randn(6, 12)
    before = model(x)
    residuals = {i: model.get_submodule(i).base_layer.weight.detach().clone() for i in ("0", "2")}
    for i in ("0", "2"):
        model.get_submodule(i).merge()
    assert torch.allclose(model(x), before, atol=1e-5)
    for i in ("0", "2"):
        model.get_submodule(i).unmerge()
        assert torch.allclose(model.get_submodule(i).base_layer.weight, residuals[i], rtol=0, atol=1e-6)
    assert torch.allclose(model(x), before, atol=1e-6)


def test_save_and_load_onto_the_original_base(tmp_path):
    """leantrain's safetensors + JSON format (peft_type LOLDU; PEFT has no LoLDU): the loaded adapter
    recomputes the same residual from the original base and reproduces the trained outputs."""
    model = _adapted()
    _train_a_little(model)
    save(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOLDU" and config["r"] == 4
    fresh = _model()
    load(fresh, tmp_path / "ad")
    x = torch.randn(4, 12)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)


def test_rank_beyond_the_weight_is_refused():
    with pytest.raises(ValueError, match="r=11 exceeds min"):
        inject(_model(), LolduConfig(r=11, target_modules=["0"]))
    with pytest.raises(ValueError, match="LolduConfig.r=0"):
        LolduConfig(r=0)


TINY = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--steps", "3"]


def test_cli_trains_r_plus_one_values_per_layer(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "loldu", "--rank", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    layers = config["target_modules"]
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    n_layers = sum(1 for k in tensors if k.endswith(".z"))
    assert layers and n_layers > 0
    assert metrics["trainable_params"] == n_layers * (4 + 1) + 32 * 3 + 3


def test_cli_refuses_an_init_loldu_cannot_honour(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "loldu", "--init", "pissa", "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "LoLDU initialises from the LU of W" in err and len(err.strip().splitlines()) == 1
