"""Differential tests of the LoRA-GA and CorDA inits against PEFT 0.21's implementation on the same model and
calibration data, and PEFT file interop in both directions.

Compared: lora_A and lora_B of every layer, and the residual base weight, within 1e-5 (fp32). Singular vectors are
defined up to sign, and LoRA-GA's A and B come from *different* singular triplets, so for each row of A and column of
B the sign is read off the PEFT tensor; the residual is then compared with PEFT's corrected for that sign choice:
W_res = W_res_peft + s·(B_p A_p - B A). CorDA's A and B share a triplet, so its residual is compared directly.
PEFT's LoRA-GA takes ``torch.svd_lowrank(G, q=min(4r, min(G.shape)))``, leantrain the exact ``torch.linalg.svd``.
On the Linear stack (r=4) q = min(G.shape), so PEFT's randomized SVD is exact too. On the tiny BERT r=2 (q=8 of 32):
the calibration gradients' spectra fall off fast, so the top 2r vectors agree within 1e-5 anyway. (At r=8 the last
rows of A, whose singular values are ~1e-5 of the largest and ~1e-5 apart, differ by 2e-4 between the two SVDs in
fp32: an ill-conditioned singular vector, not a different formula; B and the residual still agree.)

PEFT 0.21.2's corda.py imports ``attr`` (the attrs package, not a PEFT dependency) for ``attr.dataclass`` on one
record class; when attrs is absent the test supplies ``dataclasses.dataclass`` under that name.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

from leantrain import adapters
from leantrain.adapters import LoraConfig
from leantrain.adapters.inject import adapter_layers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.peer
try:
    import attr  # noqa: F401
except ImportError:
    sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
from peft.tuners.lora import LoraGAConfig, preprocess_loraga
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

TOL = 1e-5
R_BERT = 2


def linear_stack(make_net):
    """Tiny Linear stack (the ``linear_net`` fixture), r=4: min(shape) <= 4r for both layers. 2-D inputs, one call
    per calibration batch."""
    net, x, y = make_net()
    return net, ["lin0", "lin1"], 4, [(x[i],) for i in range(4)], list(y)


def tiny_bert():
    """leantrain's random 2-layer BERT (hidden 32, intermediate 64, dropout 0), r=2; batches of one sentence, the
    shape PEFT's CorDA hook handles (it squeezes dim 0)."""
    from leantrain.models import build_classifier

    model = build_classifier("tiny", 3, seed=0, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 1, 10), generator=gen)
    labels = torch.randint(0, 3, (4, 1), generator=gen)
    return model, ["query", "key", "value", "dense"], R_BERT, [(i, torch.ones_like(i)) for i in ids], list(labels)


def build(model_name: str, make_net):
    return linear_stack(make_net) if model_name == "linear" else tiny_bert()


MODELS = ("linear", "bert")


def calib_of(inputs, labels):
    def losses(model: nn.Module):
        for args, y in zip(inputs, labels):
            yield nn.functional.cross_entropy(model(*args), y)
    return losses


def ours(model, targets, r, init, inputs, labels, **kw):
    model = copy.deepcopy(model)
    adapters.inject(model, LoraConfig(r=r, alpha=5, target_modules=targets, init=init, **kw),
                    calib=calib_of(inputs, labels))
    return model


def peft_lora_ga(model, targets, r, inputs, labels, **kw):
    model = copy.deepcopy(model)
    config = peft.LoraConfig(r=r, lora_alpha=5, target_modules=targets, init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig(**kw))
    preprocess_loraga(model, config, lambda: [loss.backward() for loss in calib_of(inputs, labels)(model)])
    return peft.get_peft_model(model, config)


def peft_corda(model, targets, r, mode, inputs):
    model = copy.deepcopy(model)
    config = peft.LoraConfig(r=r, lora_alpha=5, target_modules=targets, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(model, config, run_model=lambda: [model(*args) for args in inputs])
    return peft.get_peft_model(model, config)


def compare(mine: nn.Module, theirs, triplet_signs: bool) -> None:
    """A, B per layer up to sign; the residual W (sign-corrected for LoRA-GA, see the module docstring)."""
    layers = list(adapter_layers(mine))
    assert layers
    peft_modules = dict(theirs.base_model.model.named_modules())
    for name, layer in layers:
        p, q = layer.adapters["default"], peft_modules[name]
        a, b = p.lora_A.detach(), p.lora_B.detach()
        a_p, b_p = q.lora_A["default"].weight.detach(), q.lora_B["default"].weight.detach()
        sign_a, sign_b = torch.sign((a * a_p).sum(1)), torch.sign((b * b_p).sum(0))
        if triplet_signs:
            assert torch.equal(sign_a, sign_b), name
        torch.testing.assert_close(a, sign_a[:, None] * a_p, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(b, b_p * sign_b, atol=TOL, rtol=0, msg=name)
        w, w_p = layer.base_layer.weight.detach(), q.base_layer.weight.detach()
        expected = w_p + p.scaling * (b_p @ a_p - (b_p * sign_b) @ (sign_a[:, None] * a_p))
        torch.testing.assert_close(w, expected, atol=TOL, rtol=0, msg=name)


GA_CASES = [{}, {"direction": "A2rBr"}, {"direction": "ArBr", "scale": "unit"}, {"scale": "gd_scale"},
            {"stable_gamma": 4}]


@pytest.mark.parametrize("model_name, kw", [("bert", {}), *(("linear", kw) for kw in GA_CASES)],
                         ids=lambda v: (",".join(f"{k}={x}" for k, x in v.items()) or "default") if isinstance(v, dict)
                         else v)
def test_lora_ga_matches_peft(model_name, kw, linear_net):
    model, targets, r, inputs, labels = build(model_name, linear_net)
    names = {"direction": "lora_ga_direction", "scale": "lora_ga_scale", "stable_gamma": "lora_ga_gamma"}
    mine = ours(model, targets, r, "lora-ga", inputs, labels, **{names[k]: v for k, v in kw.items()})
    compare(mine, peft_lora_ga(model, targets, r, inputs, labels, **kw), triplet_signs=False)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_corda_matches_peft(model_name, mode, linear_net):
    model, targets, r, inputs, labels = build(model_name, linear_net)
    mine = ours(model, targets, r, f"corda-{mode}", inputs, labels)
    compare(mine, peft_corda(model, targets, r, mode, inputs), triplet_signs=True)


def _perturb(params) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in params:
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("init", ["lora-ga", "corda-kpm", "corda-ipm"])
def test_leantrain_files_load_in_peft(init, tmp_path, linear_net):
    """Onto the residual base (PEFT's convention), and converted to plain LoRA onto the original base."""
    model, targets, r, inputs, labels = linear_stack(linear_net)
    mine = ours(model, targets, r, init, inputs, labels)
    _perturb(mine.named_parameters())
    x = torch.cat([args[0] for args in inputs])
    adapters.save(mine, tmp_path / "residual")
    adapters.save(mine, tmp_path / "plain", pissa_to_lora=True)
    residual = copy.deepcopy(mine)
    adapters.unload(residual)
    with pytest.warns(UserWarning, match="corda_config") if init != "lora-ga" else _no_warning():
        loaded = peft.PeftModel.from_pretrained(residual, tmp_path / "residual")
    torch.testing.assert_close(loaded(x), mine(x), atol=TOL, rtol=0)
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "plain")
    torch.testing.assert_close(plain(x), mine(x), atol=TOL, rtol=0)


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("init", ["lora-ga", "corda-kpm"])
def test_peft_files_load_in_leantrain(init, tmp_path, linear_net):
    """PEFT's saved adapter onto its residual base; PEFT's rank-2r conversion onto the original base."""
    model, targets, r, inputs, labels = linear_stack(linear_net)
    if init == "lora-ga":
        theirs = peft_lora_ga(model, targets, r, inputs, labels)
    else:
        theirs = peft_corda(model, targets, r, "kpm", inputs)
    config = theirs.peft_config["default"]
    config.init_lora_weights, original_init = True, config.init_lora_weights
    theirs.save_pretrained(tmp_path / "init")  # PEFT's path_initial_model_for_weight_conversion recipe
    config.init_lora_weights = original_init
    _perturb(theirs.named_parameters())
    x = torch.cat([args[0] for args in inputs])
    expected = theirs(x)
    theirs.save_pretrained(tmp_path / "trained")
    theirs.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    residual = copy.deepcopy(theirs).unload()
    adapters.load(residual, tmp_path / "trained")
    assert adapters.adapter_config(residual, "default").init == init
    torch.testing.assert_close(residual(x), expected, atol=TOL, rtol=0)
    original = copy.deepcopy(model)
    adapters.load(original, tmp_path / "plain")
    torch.testing.assert_close(original(x), expected, atol=TOL, rtol=0)
