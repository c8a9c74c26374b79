"""GradNormLoRP: weight-normalised layers whose direction gradients are projected to low rank
(Huang et al., AAAI 2025, arXiv 2412.19616).

Each targeted ``nn.Linear`` becomes ``WeightNormLinear`` with ``W = g * V / ||V||_row`` (norm over the input
dimension of PyTorch's (out, in) weight, one magnitude per output unit; ``g = ||W0||_row`` and ``V = W0`` at init,
so the model is unchanged). ``apply`` returns param groups in which the V matrices carry the GaLore keys
(``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``svd``), so any leantrain Adam (fp32, 8-bit, 4-bit)
keeps their moments in low-rank space; g vectors, biases, norms and embeddings use the ordinary update. After
training ``merge`` turns every layer back into a plain ``nn.Linear`` (no inference cost).

The published code does not train (see the spec, B.2); this is a clean implementation of the paper's method:
autograd on ``W = g V/||V||`` gives exactly the Salimans-Kingma gradients ``dL/dg_i = <G_i, v_i/||v_i||>`` and
``dL/dV_i = g_i/||V_i|| (G_i - <G_i, v^_i> v^_i)``, and the projector/optimizer core does the rest.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import write_safetensors_atomic, write_text_atomic
from ..config import TrainConfig
from ..methods import Calibration, head_parameter_names
from ..targets import of_kind, resolve, set_submodule
from .projector import check_group

NORM_EPS = 1e-12  # guards all-zero rows (their g is 0 too, so W stays 0)


class WeightNormLinear(nn.Module):
    """``y = x (g * V/||V||_row)^T + b``: a Linear split into a magnitude ``weight_g`` (out,) and a direction
    ``weight_v`` (out, in). Parameter names follow ``torch.nn.utils.weight_norm``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.weight_g = nn.Parameter(torch.empty(out_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> WeightNormLinear:
        """Reparametrise ``linear`` exactly: ``V = W0``, ``g = ||W0||_row``; the bias Parameter is shared."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"WeightNormLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight_v = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
        layer.weight_g = nn.Parameter(torch.linalg.vector_norm(w.float(), dim=1).to(w.dtype),
                                      requires_grad=linear.weight.requires_grad)
        layer.bias = linear.bias
        return layer

    def weight(self) -> Tensor:
        """The effective weight ``g * V / ||V||_row`` (differentiable)."""
        v = self.weight_v
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(NORM_EPS)
        return v * (self.weight_g.unsqueeze(1) / norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight (shares the bias Parameter)."""
        v = self.weight_v
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=v.device, dtype=v.dtype)
        linear.weight.copy_(self.weight())
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------- targeting
def resolve_linear_targets(model: nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` modules ``targets`` selects (``leantrain.targets`` rule). The task head is never
    selected: the training loop trains it as a plain Linear, so it must not be reparametrised."""
    return resolve(model, targets, kind=of_kind(nn.Linear), heads="never", what="nn.Linear")


def reparametrize(model: nn.Module, targets: str = "all-linear") -> list[str]:
    """Replace the targeted Linear layers of ``model`` by ``WeightNormLinear`` in place; return their names."""
    names = resolve_linear_targets(model, targets)
    for name in names:
        set_submodule(model, name, WeightNormLinear.from_linear(model.get_submodule(name)))
    return names


def merge(model: nn.Module) -> list[str]:
    """Turn every ``WeightNormLinear`` of ``model`` back into a plain ``nn.Linear`` in place; return names."""
    names = [n for n, m in model.named_modules() if isinstance(m, WeightNormLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    return names


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict the model would have after ``merge`` (original key names), without changing it."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WeightNormLinear)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in layers and leaf in ("weight_v", "weight_g"):
            if leaf == "weight_v":
                out[f"{prefix}.weight"] = layers[prefix].weight().detach().contiguous()
            continue
        out[key] = value.detach().contiguous()
    return out


# ---------------------------------------------------------------------------------------------- method
class GradNormLoRP:
    """Registry method ``gradnormlorp``: weight-normalise the targeted Linear layers and tag their directions
    for gradient low-rank projection. Use with ``--optim adamw`` (fp32 states) or ``adamw8bit``/``adamw4bit``."""

    name = "gradnormlorp"
    default_lr = 1e-4  # the V update is scaled by proj_scale (0.25), so ~2x full fine-tuning's 5e-5 overall

    def apply(self, model: nn.Module, cfg: TrainConfig, calib: Calibration | None = None) -> list[dict]:
        head = head_parameter_names(model)
        for p in model.parameters():
            p.requires_grad_(True)
        layers = reparametrize(model, cfg.targets)
        directions = [model.get_submodule(n).weight_v for n in layers]
        projected = [v for v in directions if min(v.shape) > cfg.rank]  # rank >= min(m, n) would save nothing
        ids = {id(v) for v in projected}
        rest = [p for n, p in model.named_parameters() if n not in head and id(p) not in ids]
        group = {"params": projected, "name": "gradnormlorp", "rank": cfg.rank, "update_proj_gap": cfg.gap,
                 "scale": cfg.proj_scale, "proj_type": "std", "svd": cfg.svd}
        check_group(group, where="gradnormlorp")
        groups = [group, {"params": rest, "name": "other"}]
        return [g for g in groups if g["params"]]

    def save_artifacts(self, model: nn.Module, run_dir: str | Path, cfg: TrainConfig) -> None:
        """Write ``merged_model.safetensors`` (plain-Linear weights, original key names) + a JSON manifest."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        layers = [n for n, m in model.named_modules() if isinstance(m, WeightNormLinear)]
        state = {k: v.cpu() for k, v in merged_state_dict(model).items()}
        write_safetensors_atomic(run_dir / "merged_model.safetensors", state,
                                 metadata={"format": "pt", "method": self.name})
        manifest = {"method": self.name, "merged_layers": layers, "rank": cfg.rank, "update_proj_gap": cfg.gap,
                    "scale": cfg.proj_scale, "svd": cfg.svd, "optim": cfg.optim}
        write_text_atomic(run_dir / "merged_model.json", json.dumps(manifest, indent=2))


GRADNORMLORP = GradNormLoRP()
