"""LoRA inits that look at data: LoRA-GA (gradient SVD) and CorDA (SVD of W times the input covariance).

Both start A, B from a decomposition computed over calibration batches and write the residual
W_res = W - s·B A back into the base (like PiSSA), so the model's output is unchanged at init.

LoRA-GA (Wang et al. 2024, https://arxiv.org/abs/2407.05000): G = mean over the calibration losses of dL/dW
(taken in train mode, as PEFT does); G = U S Vᵀ (exact SVD). PEFT 0.21's ``lora_ga_init`` is followed: direction
"ArB2r" (default) takes A = Vᵀ[:r], B = U[:, r:2r]·diag(S[r:2r]); "A2rBr" the halves swapped; "ArBr" A the odd and
B the even components of the first 2r. Scale "stable" (default) multiplies B by out^¼ / √γ (γ = 16); "gd_scale"
divides A and B by s; "weight_svd" scales B by σ₁(W) / S_B[0]; "unit" leaves them. (The paper's reference code
scales both A and B by out^¼ / √γ and leaves S out; PEFT, and therefore leantrain, keep S_B in B.)

CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223, PEFT's ``preprocess_corda``): each call of a targeted
layer adds XᵀX of its input X (all leading dimensions flattened, X divided by |max X| first) to C, which is divided
by the number of calls. With C' = C + λ·mean(diag C)·I (λ = 0.01, doubled until ‖C' C'⁻¹ - I‖_F < 0.05),
W C' = U S Vhᵀ and V = (Vh C'⁻¹)ᵀ, so W = U S Vᵀ. "ipm" (instruction-previewed) adapts the r largest components,
"kpm" (knowledge-preserving) the r smallest and keeps the principal ones in the frozen residual;
A = diag(√(S/s)) Vᵀ, B = U diag(√(S/s)). The paper's KPM uses covariance from world-knowledge QA data and IPM from
the task's instructions; here both use the calibration batches given (leantrain's run: the first training batches).

``calib(model)`` yields scalar losses (the protocol SHiRA's gradient masks use); CorDA only needs the forward
passes inside it and runs them under ``torch.no_grad`` in eval mode.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .base import AdapterLayer, base_weight
from .registry import is_linear_like

LORA_GA = "lora-ga"
CORDA_KPM, CORDA_IPM = "corda-kpm", "corda-ipm"
DATA_INITS = (LORA_GA, CORDA_KPM, CORDA_IPM)
GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
CORDA_DAMP, CORDA_INV_ERROR, CORDA_MAX_DOUBLINGS = 0.01, 0.05, 40


def _base_layers(model: nn.Module, targets: list[str], init: str) -> dict[str, nn.Module]:
    """The frozen base layer of every target; data inits are defined for Linear layers only."""
    out = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if not is_linear_like(base):
            raise TypeError(f"--init {init} needs Linear layers; target {name!r} is {type(base).__name__}")
        out[name] = base
    return out


def _losses(calib: Any, model: nn.Module) -> Iterable[torch.Tensor]:
    if calib is None:
        raise ValueError("this LoRA init needs calibration batches: inject(..., calib=fn) where fn(model) yields "
                         "scalar losses")
    losses = calib(model)
    return [losses] if isinstance(losses, torch.Tensor) else losses


def mean_gradients(model: nn.Module, targets: list[str], calib: Any) -> dict[str, torch.Tensor]:
    """dL/dW of every target's base weight, averaged over the losses ``calib(model)`` yields (LoRA-GA).

    Runs in train mode like PEFT's ``estimate_gradients``; ``torch.autograd.grad`` leaves every ``.grad`` alone,
    and every ``requires_grad`` flag and train/eval mode is restored afterwards.
    """
    bases = _base_layers(model, targets, LORA_GA)
    weights = {}
    for name, base in bases.items():
        w = getattr(base, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.is_floating_point() or hasattr(base, "dequantize"):
            raise ValueError(f"--init lora-ga needs the full-precision weight of {name!r} to take its gradient; "
                             "drop --quantize")
        weights[name] = w
    flags = {id(p): p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    sums = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            for loss in _losses(calib, model):
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ValueError("--init lora-ga: calibration must yield scalar losses that depend on the model")
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for name, g in zip(weights, grads):
                    if g is not None:
                        sums[name] += g.detach().float()
                count += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        for m, training in modes.items():
            m.train(training)
    if count == 0:
        raise ValueError("--init lora-ga: the calibration yielded no losses")
    return {n: s / count for n, s in sums.items()}


def input_covariances(model: nn.Module, targets: list[str], calib: Any, init: str) -> dict[str, torch.Tensor]:
    """C = mean over calls of XᵀX (X: the layer's input, rows scaled by 1/|max X|) of every target (CorDA)."""
    bases = _base_layers(model, targets, init)
    sums: dict[str, torch.Tensor] = {}
    calls = dict.fromkeys(bases, 0)

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"--init {init}: the input of {name!r} is not finite (or all zero) in calibration")
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            calls[name] += 1
        return record

    modes = {m: m.training for m in model.modules()}
    handles = [base.register_forward_hook(hook(name)) for name, base in bases.items()]
    try:
        model.eval()
        with torch.no_grad():
            for _ in _losses(calib, model):
                pass
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    missing = [n for n, c in calls.items() if c == 0]
    if missing:
        raise ValueError(f"--init {init}: the calibration never ran layer(s) {missing[:3]}")
    return {n: sums[n] / calls[n] for n in bases}


def collect(model: nn.Module, targets: list[str], calib: Any, init: str) -> dict[str, torch.Tensor]:
    """Per-target statistic of init ``init``: the mean gradient (LoRA-GA) or the input covariance (CorDA)."""
    if init == LORA_GA:
        return mean_gradients(model, targets, calib)
    return input_covariances(model, targets, calib, init)


def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scaling: float, direction: str = "ArB2r",
                    scale: str = "stable", gamma: float = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from the SVD of the mean gradient ``grad`` (out, in); see the module docstring."""
    u, s, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if 2 * r > s.numel():
        raise ValueError(f"--init lora-ga takes 2r={2 * r} singular vectors of a {tuple(grad.shape)} gradient; "
                         "lower --rank")
    first, second = torch.arange(r), torch.arange(r, 2 * r)
    idx_a, idx_b = {"ArB2r": (first, second), "A2rBr": (second, first),
                    "ArBr": (torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2))}[direction]
    a, s_b = vh[idx_a], s[idx_b]
    b = u[:, idx_b] * s_b
    if scale == "stable":
        b = b * grad.shape[0] ** 0.25 / gamma ** 0.5
    elif scale == "weight_svd" and s_b[0] > 0:
        b = b * torch.linalg.matrix_norm(weight.float(), ord=2) / s_b[0]
    elif scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


def corda_inverse(cov: torch.Tensor, where: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(C', C'⁻¹) with C' = C + λ·mean(diag C)·I, λ doubled from 0.01 until C'C'⁻¹ is within 0.05 of I."""
    c = cov.float()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    level = c.diagonal().mean()
    if not torch.isfinite(level) or level <= 0:
        raise ValueError(f"CorDA: the input covariance of {where!r} is zero or not finite")
    damp = CORDA_DAMP
    for _ in range(CORDA_MAX_DOUBLINGS):
        fixed = c + eye * level * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < CORDA_INV_ERROR:
            return fixed, inv
        damp *= 2
    raise ValueError(f"CorDA: the input covariance of {where!r} stays singular after damping")


def corda_factors(weight: torch.Tensor, cov: torch.Tensor, r: int, scaling: float, mode: str,
                  where: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of CorDA ``mode`` ("ipm": largest r components of W C, "kpm": smallest r)."""
    fixed, inv = corda_inverse(cov, where)
    u, s, vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    if r > s.numel():
        raise ValueError(f"CorDA r={r} exceeds min(in, out)={s.numel()} of layer {where!r}")
    pick = slice(0, r) if mode == "ipm" else slice(s.numel() - r, s.numel())
    root = torch.sqrt(s[pick] / scaling)
    a = root[:, None] * (vh[pick] @ inv)
    b = u[:, pick] * root[None, :]
    return a, b


def data_factors(base: nn.Module, stat: torch.Tensor, init: str, r: int, scaling: float, config: Any,
                 where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial (A, B) of ``init`` for one layer from its statistic (gradient or covariance)."""
    w = base_weight(base)
    if init == LORA_GA:
        if 2 * r > min(w.shape):
            raise ValueError(f"--init lora-ga takes 2r={2 * r} gradient singular vectors; layer {where!r} "
                             f"({w.shape[1]}->{w.shape[0]}) has {min(w.shape)}: lower --rank")
        return lora_ga_factors(stat, w, r, scaling, config.lora_ga_direction, config.lora_ga_scale,
                               config.lora_ga_gamma)
    return corda_factors(w, stat, r, scaling, "kpm" if init == CORDA_KPM else "ipm", where)
