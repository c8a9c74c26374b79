"""Saving trainable weights copies only what safetensors cannot take as is (shared or non-contiguous storage), so a
7B run does not hold a second 13 GB copy of its weights while writing trainable.safetensors or a checkpoint."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from leantrain.checkpoint import _contiguous, save_tensors_atomic


def test_only_shared_or_strided_tensors_are_copied(tmp_path) -> None:
    weight = torch.randn(8, 4)
    tied = weight  # a tied head: the same storage twice
    strided = torch.randn(4, 8).t()
    state = {"embed": weight, "head": tied, "strided": strided, "bias": torch.zeros(4)}
    out = _contiguous(state)
    assert out["embed"].untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert out["bias"].untyped_storage().data_ptr() == state["bias"].untyped_storage().data_ptr()
    assert out["head"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    assert out["strided"].is_contiguous()
    save_tensors_atomic(state, tmp_path / "t.safetensors")
    loaded = load_file(str(tmp_path / "t.safetensors"))
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
