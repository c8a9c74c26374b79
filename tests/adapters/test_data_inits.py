"""LoRA-GA and CorDA inits (leantrain/adapters/data_inits.py): the math on known matrices, the output unchanged at
init, the file round trips (initial factors -> the same residual; none -> PEFT's convention; conversion to a plain
rank-2r LoRA), the run wiring (calibration batches, `leantrain merge`, resume) and bad input.

The differential tests against PEFT's implementation are in test_data_inits_peft.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig
from leantrain.adapters.data_inits import corda_factors, corda_inverse, input_covariances, lora_ga_factors
from leantrain.adapters.lora import INITIAL_NAME
from leantrain.config import TrainConfig

INITS = ["lora-ga", "corda-kpm", "corda-ipm"]


def calib_for(x: torch.Tensor, y: torch.Tensor):
    def losses(model: nn.Module):
        for i in range(len(x)):
            yield nn.functional.cross_entropy(model(x[i]), y[i])
    return losses


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def perturb(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


# ---- the math on matrices with known decompositions ---------------------------------------------------------
@pytest.mark.parametrize("direction, a_idx, b_idx", [("ArB2r", [0, 1, 2], [3, 4, 5]), ("A2rBr", [3, 4, 5], [0, 1, 2]),
                                                     ("ArBr", [1, 3, 5], [0, 2, 4])])
def test_lora_ga_takes_the_gradient_singular_vectors(direction, a_idx, b_idx):
    out_f, in_f, r = 20, 10, 3
    u, v = orthonormal(out_f, in_f, 0), orthonormal(in_f, in_f, 1)
    s = torch.linspace(5, 0.5, in_f, dtype=torch.float64)
    grad = (u * s) @ v.T
    a, b = lora_ga_factors(grad, torch.zeros(out_f, in_f), r, scaling=2.0, direction=direction, scale="unit")
    # singular vectors are defined up to sign: compare projectors and the norms the scale fixes
    torch.testing.assert_close((a.T @ a).double(), v[:, a_idx] @ v[:, a_idx].T, atol=1e-5, rtol=0)
    bb = (b.T @ b).double()
    torch.testing.assert_close(bb, torch.diag(s[b_idx] ** 2), atol=1e-4, rtol=0)
    _, b_stable = lora_ga_factors(grad, torch.zeros(out_f, in_f), r, 2.0, direction, "stable", gamma=9)
    torch.testing.assert_close(b_stable.abs(), b.abs() * out_f ** 0.25 / 3, atol=1e-6, rtol=1e-5)
    a_gd, b_gd = lora_ga_factors(grad, torch.zeros(out_f, in_f), r, 2.0, direction, "gd_scale")
    torch.testing.assert_close((a_gd.abs(), b_gd.abs()), (a.abs() / 2, b.abs() / 2))


def test_lora_ga_weight_svd_scale_matches_the_top_singular_value_of_w():
    grad = (orthonormal(16, 8, 2) * torch.arange(8, 0, -1)) @ orthonormal(8, 8, 3).T
    w = 3.0 * orthonormal(16, 8, 4) @ orthonormal(8, 8, 5).T  # every singular value 3
    _, b = lora_ga_factors(grad, w, 2, 1.0, "ArB2r", "weight_svd")
    assert torch.linalg.norm(b[:, 0]).item() == pytest.approx(3.0, rel=1e-5)  # S_B[0] scaled to sigma_1(W)


def test_corda_components_partition_w_and_ipm_takes_the_largest():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 6, generator=gen)
    x = torch.randn(50, 6, generator=gen) * torch.tensor([3, 1, 1, .5, .2, 2.0])
    cov = x.T @ x / 50
    s = 0.5
    a_i, b_i = corda_factors(w, cov, 2, s, "ipm")
    a_k, b_k = corda_factors(w, cov, 4, s, "kpm")
    torch.testing.assert_close(s * (b_i @ a_i + b_k @ a_k), w, atol=1e-5, rtol=0)  # 2 + 4 = all of W
    fixed, inv = corda_inverse(cov)
    torch.testing.assert_close(fixed @ inv, torch.eye(6, dtype=torch.float32), atol=0.05, rtol=0)
    sig = torch.linalg.svdvals(w @ fixed)
    torch.testing.assert_close(torch.linalg.norm(b_i, dim=0) ** 2, sig[:2] / s, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.norm(b_k, dim=0) ** 2, sig[2:] / s, rtol=1e-5, atol=0)
    ac = a_i @ fixed  # = diag(sqrt(S/s)) Vhᵀ rows: orthogonal, squared norms S/s
    torch.testing.assert_close(ac @ ac.T, torch.diag(sig[:2] / s), rtol=1e-4, atol=1e-4)


def test_corda_covariance_is_the_mean_of_scaled_input_gram_matrices(linear_net):
    net, x, y = linear_net()
    cov = input_covariances(net, ["lin0"], calib_for(x, y), "corda-ipm")["lin0"]
    expected = sum((xi / xi.max().abs()).T @ (xi / xi.max().abs()) for xi in x) / len(x)
    torch.testing.assert_close(cov, expected, atol=1e-6, rtol=1e-6)
    assert net.training  # the mode is restored


# ---- behaviour of the adapter -------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("flags", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_output_unchanged_at_init_and_base_becomes_residual(init, flags, linear_net):
    net, x, y = linear_net()
    ref, w0 = net(x), net.lin0.weight.detach().clone()
    cfg = LoraConfig(r=3, alpha=5, target_modules=["lin0", "lin1"], init=init, **flags)
    adapters.inject(net, cfg, calib=calib_for(x, y))
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=0)
    p = net.lin0.adapters["default"]
    assert (p.lora_B.abs().sum() > 0) and (p.lora_A.abs().sum() > 0)
    torch.testing.assert_close(net.lin0.base_layer.weight + p.scaling * p.lora_B @ p.lora_A, w0, atol=1e-6, rtol=0)
    assert not cfg._stats  # per-layer statistics are dropped once used


def test_lora_ga_gradient_is_the_mean_over_calibration_batches(linear_net):
    net, x, y = linear_net()
    grads = [torch.autograd.grad(nn.functional.cross_entropy(net(x[i]), y[i]), net.lin1.weight)[0] for i in range(4)]
    mean = torch.stack(grads).mean(0)
    a_ref, b_ref = lora_ga_factors(mean, net.lin1.weight, 2, 2.0)
    adapters.inject(net, LoraConfig(r=2, alpha=4, target_modules=["lin1"], init="lora-ga"), calib=calib_for(x, y))
    p = net.lin1.adapters["default"]
    torch.testing.assert_close(p.lora_A.abs(), a_ref.abs(), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.lora_B.abs(), b_ref.abs(), atol=1e-6, rtol=0)
    assert all(q.grad is None for q in net.parameters())  # autograd.grad: no .grad left behind


@pytest.mark.parametrize("init", INITS)
def test_file_round_trip_rebuilds_the_residual_from_the_original_weights(init, tmp_path, linear_net):
    net, x, y = linear_net()
    original = copy.deepcopy(net)
    adapters.inject(net, LoraConfig(r=3, alpha=5, target_modules=["lin0", "lin1"], init=init), calib=calib_for(x, y))
    perturb(net)
    adapters.save(net, tmp_path)
    assert (tmp_path / INITIAL_NAME).is_file()
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    if init == "lora-ga":
        assert body["init_lora_weights"] == "lora_ga" and body["lora_ga_config"]["scale"] == "stable"
    else:  # PEFT cannot load init "corda" without preprocess_corda; the sub-config carries the mode
        assert body["init_lora_weights"] is True and body["corda_config"]["corda_method"] == init[-3:]
    loaded = copy.deepcopy(original)
    adapters.load(loaded, tmp_path)
    assert adapters.adapter_config(loaded, "default").init == init
    assert torch.equal(loaded.lin0.base_layer.weight, net.lin0.base_layer.weight)  # same residual, bit for bit
    torch.testing.assert_close(loaded(x), net(x), atol=1e-6, rtol=0)
    # saved again after loading: the same initial factors
    adapters.save(loaded, tmp_path / "again")
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "again" / INITIAL_NAME)).keys() == load_file(str(tmp_path / INITIAL_NAME)).keys()


def test_without_initial_factors_the_base_is_taken_as_the_residual(tmp_path, linear_net):
    """PEFT's convention for LoRA-GA/CorDA files: they load onto the model given, which holds the residual."""
    net, x, y = linear_net()
    adapters.inject(net, LoraConfig(r=3, alpha=5, target_modules=["lin0"], init="corda-kpm"), calib=calib_for(x, y))
    perturb(net)
    adapters.save(net, tmp_path)
    (tmp_path / INITIAL_NAME).unlink()
    residual = copy.deepcopy(net)
    adapters.unload(residual)
    adapters.load(residual, tmp_path)
    torch.testing.assert_close(residual(x), net(x), atol=1e-6, rtol=0)
    adapters.save(residual, tmp_path / "again")  # nothing to write: no stale initial factors either
    assert not (tmp_path / "again" / INITIAL_NAME).exists()


@pytest.mark.parametrize("init", ["lora-ga", "corda-ipm"])
def test_conversion_to_plain_lora_against_the_original_weights(init, tmp_path, linear_net):
    net, x, y = linear_net()
    original = copy.deepcopy(net)
    adapters.inject(net, LoraConfig(r=3, alpha=5, target_modules=["lin0", "lin1"], init=init), calib=calib_for(x, y))
    perturb(net)
    adapters.save(net, tmp_path, pissa_to_lora=True)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["r"] == 6 and body["init_lora_weights"] is True and "corda_config" not in body
    assert not (tmp_path / INITIAL_NAME).exists()
    adapters.load(original, tmp_path)
    torch.testing.assert_close(original(x), net(x), atol=1e-5, rtol=0)


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_input(linear_net):
    net, x, y = linear_net()
    with pytest.raises(ValueError, match="needs calibration batches"):
        adapters.inject(copy.deepcopy(net), LoraConfig(r=2, target_modules=["lin0"], init="corda-kpm"))
    with pytest.raises(ValueError, match="2r=14 .*'lin0'"):
        adapters.inject(copy.deepcopy(net), LoraConfig(r=7, target_modules=["lin0"], init="lora-ga"),
                        calib=calib_for(x, y))
    with pytest.raises(ValueError, match="CorDA r=13 exceeds"):
        adapters.inject(copy.deepcopy(net), LoraConfig(r=13, target_modules=["lin0"], init="corda-ipm"),
                        calib=calib_for(x, y))
    with pytest.raises(ValueError, match="lora_ga_scale='big'"):
        LoraConfig(init="lora-ga", lora_ga_scale="big")
    with pytest.raises(ValueError, match="lora_ga_gamma"):
        LoraConfig(init="lora-ga", lora_ga_gamma="16")
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="needs Linear layers"):
        adapters.inject(emb, LoraConfig(r=1, target_modules=["0"], init="corda-ipm"),
                        calib=lambda m: [m(torch.arange(5)).sum()])
    assert isinstance(emb[0], nn.Embedding)  # nothing was wrapped


def test_train_config_refuses_what_the_inits_cannot_do():
    with pytest.raises(ValueError, match="works with --method lora, rslora or dora, not 'vera'"):
        TrainConfig(model="tiny", method="vera", init="corda-kpm")
    with pytest.raises(ValueError, match="drop --quantize nf4"):
        TrainConfig(model="tiny", method="lora", init="lora-ga", quantize="nf4")
    with pytest.raises(ValueError, match="lora_ga_direction='random'"):
        TrainConfig(model="tiny", method="lora", init="lora-ga", extra={"lora_ga_direction": "random"})
    cfg = TrainConfig(model="tiny", method="lora", init="lora-ga", extra={"lora_ga_scale": "unit"})
    from leantrain.adapters.methods import LORA
    assert LORA.build(cfg).lora_ga_scale == "unit"


# ---- the run: calibration batches reach the init, the run's files rebuild the trained model ---------------------
@pytest.mark.parametrize("init", INITS)
def test_method_apply_uses_calibration_and_run_files_rebuild_the_model(init, tmp_path):
    """What `leantrain merge` does with RUN/adapter: load it onto a freshly built original model, then merge."""
    from leantrain.methods import get_method
    from leantrain.models import build_classifier

    cfg = TrainConfig(model="tiny", method="lora", rank=4, init=init, out=str(tmp_path))
    model = build_classifier("tiny", 3, cfg.seed).eval()
    ids = torch.randint(0, 1000, (4, 3, 12), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.ones_like(ids[0]), torch.tensor([0, 1, 2])

    def calib(m):
        for i in range(3):
            yield nn.functional.cross_entropy(m(ids[i], mask), labels)

    ref = model(ids[3], mask)
    method = get_method("lora")
    method.apply(model, cfg, calib)
    torch.testing.assert_close(model(ids[3], mask), ref, atol=1e-5, rtol=0)
    assert model.training is False  # the calibration restored the mode
    perturb(model)
    method.save_artifacts(model, tmp_path, cfg)
    rebuilt = build_classifier("tiny", 3, cfg.seed).eval()
    adapters.load(rebuilt, tmp_path / "adapter")
    rebuilt.classifier.load_state_dict(model.classifier.state_dict())
    adapters.merge(rebuilt)
    adapters.unload(rebuilt)
    torch.testing.assert_close(rebuilt(ids[3], mask), model(ids[3], mask), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_cli_resume_is_exact_across_the_data_init(tmp_path, tiny_args):
    """build_run recomputes the init from the same calibration batches, so a resumed run continues bit-exactly."""
    from leantrain.cli import main

    args = [*tiny_args, "--method", "lora", "--init", "lora-ga", "--steps", "4", "--save-every", "2"]
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "cut"), "--stop-at", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0

    def losses(run: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses("full") == losses("cut")
