"""PiSSA -> plain LoRA: share a PiSSA adapter as a rank-2r LoRA against the original (not residual) weights.

PiSSA trains A, B from A0, B0 on top of W_res = W - s·B0 A0, so the trained model is W + s·(BA - B0 A0) =
W + s·[B | -B0][A ; A0]: a LoRA of rank 2r with the same scaling (r -> 2r, alpha -> 2·alpha, or alpha·√2 for
rsLoRA). This mirrors PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``; see
/work/shared/methods/lora_family.md §4 and https://arxiv.org/abs/2404.02948.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

LAYER_PREFIX = "base_model.model."


def pissa_to_lora_state(
    config: Any, state: dict[str, torch.Tensor], layers: list[tuple[str, Any]], name: str
) -> tuple[Any, dict[str, torch.Tensor]]:
    """(plain LoRA config, PEFT tensors) equivalent to PiSSA adapter ``name`` on the original base weights."""
    factor = math.sqrt(2) if config.use_rslora else 2.0  # keeps s = alpha/r (or alpha/sqrt(r)) unchanged
    new_config = dataclasses.replace(
        config,
        r=2 * config.r,
        alpha=config.alpha * factor,
        init="default",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )
    out = dict(state)
    for layer_name, layer in layers:
        p = layer.adapters[name]
        if not hasattr(p, "pissa_A0"):
            raise ValueError(
                f"{layer_name}: adapter {name!r} holds no PiSSA initial factors to convert against"
            )
        a_key, b_key = (
            f"{LAYER_PREFIX}{layer_name}.lora_A.weight",
            f"{LAYER_PREFIX}{layer_name}.lora_B.weight",
        )
        out[a_key] = torch.cat(
            [state[a_key], p.pissa_A0.detach().cpu().to(state[a_key].dtype)], 0
        ).contiguous()
        out[b_key] = torch.cat(
            [state[b_key], -p.pissa_B0.detach().cpu().to(state[b_key].dtype)], 1
        ).contiguous()
    return new_config, out
