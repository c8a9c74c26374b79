"""GradNormLoRP: weight-normalised layers whose direction gradients are projected to low rank
(Huang et al., AAAI 2025, arXiv 2412.19616).

Each targeted ``nn.Linear`` becomes ``WeightNormLinear`` with ``W = g * V / ||V||_row`` (norm over the input
dimension of PyTorch's (out, in) weight, one magnitude per output unit; ``g = ||W0||_row`` and ``V = W0`` at init,
so the model is unchanged). ``apply`` returns param groups in which the V matrices carry the GaLore keys
(``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``svd``), so any leantrain Adam (fp32, 8-bit, 4-bit)
keeps their moments in low-rank space; g vectors, biases, norms and embeddings use the ordinary update. After
training ``merge`` turns every layer back into a plain ``nn.Linear`` (no inference cost). This module holds the
layer and the model transformations; the training method (``--method gradnormlorp``) is leantrain/gradnormlorp.py.

The published code does not train (see the spec, B.2); this is a clean implementation of the paper's method:
autograd on ``W = g V/||V||`` gives exactly the Salimans-Kingma gradients ``dL/dg_i = <G_i, v_i/||v_i||>`` and
``dL/dV_i = g_i/||V_i|| (G_i - <G_i, v^_i> v^_i)``, and the projector/optimizer core does the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..targets import of_kind, resolve, set_submodule

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


def __getattr__(name: str):
    """``GRADNORMLORP`` / ``GradNormLoRP`` (the training method) moved to :mod:`leantrain.gradnormlorp`, which may
    import the run config; resolved lazily so this optimizer-side module never does."""
    if name in ("GRADNORMLORP", "GradNormLoRP"):
        from .. import gradnormlorp

        return getattr(gradnormlorp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
