"""The ``gradnormlorp`` training method (Huang et al., AAAI 2025, arXiv 2412.19616): weight-normalise the targeted
Linear layers (leantrain/optim/gradnorm.py) and tag their directions for gradient low-rank projection.

Lives outside ``leantrain.optim`` because a method reads the run config; the layer and the transformations it
uses stay in the optimizer package, which must not.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import write_safetensors_atomic, write_text_atomic
from .config import TrainConfig
from .methods import Calibration, EstimatorTensor, MethodBase, head_parameter_names, register
from .optim.gradnorm import WeightNormLinear, merged_state_dict, reparametrize
from .optim.projector import check_group


class GradNormLoRP(MethodBase):
    """Registry method ``gradnormlorp``: weight-normalise the targeted Linear layers and tag their directions
    for gradient low-rank projection. Use with ``--optim adamw`` (fp32 states) or ``adamw8bit``/``adamw4bit``."""

    name = "gradnormlorp"
    default_lr = 1e-4  # the V update is scaled by proj_scale (0.25), so ~2x full fine-tuning's 5e-5 overall
    summary = "GradNormLoRP: weight-normalised layers, direction gradients projected to rank r (--rank, --gap)"
    trains_base = True
    replaces_targets = True
    options = ("rank", "targets", "gap", "proj_scale", "svd")

    def estimator_tensors(self, module: str, out_f: int, in_f: int, cfg: Any) -> list[EstimatorTensor]:
        """W becomes a direction V (projected moments when min(out, in) > rank) and a magnitude g."""
        return [EstimatorTensor(module + ".weight.V", (out_f, in_f), projectable=True, base=True),
                EstimatorTensor(module + ".weight.g", (out_f,), base=True)]

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


GRADNORMLORP = register(GradNormLoRP())
