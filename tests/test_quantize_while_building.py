"""--quantize on a scratch model quantizes each Linear as soon as it is built (meta_init's convert hook): the same
codes as building first and quantizing after, without the full-precision base ever existing at once."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from leantrain.lm.models import build_scratch_lm
from leantrain.memory.measuring import _peak_from_profile
from leantrain.quant import QuantLinear, model_nbytes, quantize, quantize_while_building, quantized_layers


@pytest.mark.parametrize("bits", ["nf4", "int8"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj"]])
def test_same_codes_as_quantizing_after_the_build(bits: str, targets) -> None:
    after = build_scratch_lm("llama", "nano", 300, seed=3, dtype=torch.bfloat16)
    quantize(after, bits=bits, targets=targets)
    during = build_scratch_lm("llama", "nano", 300, seed=3, dtype=torch.bfloat16,
                              convert=quantize_while_building(bits, targets))
    assert sorted(quantized_layers(during)) == sorted(quantized_layers(after))
    want, got = after.state_dict(), during.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not any(t.is_meta for t in during.state_dict().values())


def quantize_transient(out_features: int, in_features: int) -> int:
    """Profiled peak of quantizing one bf16 Linear of this shape on its own (codes, absmax and temporaries)."""
    linear = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        QuantLinear.from_linear(linear, bits=4, block_size=64, double_quant=True)
    return _peak_from_profile(prof)


def test_the_build_never_holds_the_full_precision_base() -> None:
    """Peak while building 60m with NF4 <= the final (mostly 4-bit) model + the largest module's fp32 draw + the
    transient of quantizing the largest matrix; the bf16 base alone is ~2.8x the final model."""
    quantize_transient(1376, 512)  # the first call also allocates one-time caches (~10 MB), kept afterwards
    transient = quantize_transient(1376, 512)  # 60m's largest quantized matrix
    convert = quantize_while_building("nf4")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_scratch_lm("llama", "60m", 4000, seed=0, dtype=torch.bfloat16, convert=convert)
    peak = _peak_from_profile(prof)
    quantized = quantized_layers(model).values()
    assert len(quantized) == 8 * 7
    final = model_nbytes(model)
    dense = sum(p.numel() for p in model.parameters()) * 2 + sum(m.out_features * m.in_features * 2 for m in quantized)
    largest_fp32 = max([p.numel() for p in model.parameters()] + [m.out_features * m.in_features for m in quantized]) * 4
    assert max(m.out_features * m.in_features for m in quantized) == 1376 * 512
    bound = final + largest_fp32 + transient
    assert peak <= 1.05 * bound, (peak, final, largest_fp32, bound)
    assert peak < 0.75 * dense, (peak, dense)
