"""Issue 19 item 4: scratch models are built on the meta device and materialised in the target dtype, with the
values of transformers' own eager constructor (the reference), and without a full-size fp32 copy."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertModel, LlamaForCausalLM

from leantrain.lm.models import build_scratch_lm, llama_config
from leantrain.lm.presets import preset_key
from leantrain.memory.measuring import _peak_from_profile
from leantrain.meta_init import build_materialised


def tiny_bert() -> BertModel:
    cfg = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False)


FACTORIES = {"llama-nano": lambda: LlamaForCausalLM(llama_config("nano", 300)),
             "llama-tiny": lambda: LlamaForCausalLM(llama_config("tiny", 700)),
             "bert": tiny_bert}


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialised_equals_the_eager_constructor(name: str, dtype: torch.dtype) -> None:
    factory = FACTORIES[name]
    torch.manual_seed(5)
    eager = factory()
    for p in eager.parameters():  # parameters in the dtype, buffers (rotary frequencies) stay fp32
        p.data = p.data.to(dtype)
    built = build_materialised(factory, dtype, seed=5)
    want, got = tensors(eager), tensors(built)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def test_different_seeds_give_different_weights() -> None:
    a = build_materialised(FACTORIES["llama-nano"], torch.float32, seed=0)
    b = build_materialised(FACTORIES["llama-nano"], torch.float32, seed=1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_building_in_bf16_holds_no_fp32_copy_of_the_model() -> None:
    """Peak allocation while building = the bf16 weights + one module's fp32 values (the largest matrix)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_scratch_lm("llama", "60m", 4000, seed=0, dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_fp32 = max(p.numel() for p in model.parameters()) * 4
    peak = _peak_from_profile(prof)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert peak <= weights + largest_fp32 * 1.1, (peak, weights, largest_fp32)  # an fp32 build: 2x weights


def test_a_module_init_weights_does_not_write_is_refused() -> None:
    class Custom(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Parameter(torch.zeros(3))

    class Model(LlamaForCausalLM):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.custom = Custom()

    with pytest.raises(RuntimeError, match="Custom.extra is not written by _init_weights"):
        build_materialised(lambda: Model(llama_config("nano", 50)), torch.bfloat16, seed=0)


@pytest.mark.parametrize("name,key", [("7b", "7b"), ("llama-7b", "7b"), (None, "tiny"), ("llama-nano", "nano")])
def test_preset_names(name: str | None, key: str) -> None:
    assert preset_key(name) == key


def test_unknown_preset_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"--preset 'llama-3b': choose one of nano, tiny"):
        preset_key("llama-3b")
