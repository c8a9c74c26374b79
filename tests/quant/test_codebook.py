"""Code books derived independently from their definitions (QLoRA Appendix E; bitsandbytes dynamic map)."""
from __future__ import annotations

import math

import pytest
import torch

from leantrain.quant import dynamic_code, int8_code, nf4_code


def _probit(p: torch.Tensor) -> torch.Tensor:
    # Phi^-1(p) = sqrt(2) * erfinv(2p - 1): a different route than the library's ndtri.
    return math.sqrt(2.0) * torch.erfinv(2 * p - 1)


def reference_nf4() -> torch.Tensor:
    """QLoRA: 2^(k-1) = 8 quantiles for the positive half, 2^(k-1) - 1 = 7 for the negative half, both
    normalised to [-1, 1]; delta = (1/2)(1/30 + 1/32) keeps the outermost quantile finite; zero is exact."""
    delta = 0.5 * (1 / 30 + 1 / 32)
    hi = 1 - delta
    pos = [_probit(torch.tensor(0.5 + (hi - 0.5) * (8 - i) / 8, dtype=torch.float64)) for i in range(8)]
    neg = [-_probit(torch.tensor(0.5 + (hi - 0.5) * (7 - i) / 7, dtype=torch.float64)) for i in range(7)]
    top = _probit(torch.tensor(hi, dtype=torch.float64))
    values = sorted([float(v / top) for v in pos + neg] + [0.0])
    return torch.tensor(values, dtype=torch.float64)


def test_nf4_code_matches_definition():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    torch.testing.assert_close(code.double(), reference_nf4(), atol=1e-6, rtol=0)
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0  # exact ends and an exact zero
    assert torch.all(code[1:] > code[:-1])


def test_nf4_code_known_values_from_paper():
    # Appendix E of the QLoRA paper lists the NF4 data type; spot-check a few of its printed values.
    printed = {1: -0.6961928009986877, 6: -0.09105003625154495, 8: 0.07958029955625534, 14: 0.7229568362236023}
    code = nf4_code()
    for i, v in printed.items():
        assert abs(float(code[i]) - v) < 1e-6


def test_int8_code_is_symmetric_linear():
    code = int8_code()
    assert code.shape == (255,) and code[127] == 0 and code[0] == -1 and code[-1] == 1
    steps = code[1:] - code[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 1 / 127), atol=1e-6, rtol=0)


def test_dynamic_code_properties():
    # blockwise8bit.md §8.1: 256 sorted values, code[127] == 0, code[255] == 1, code[0] ≈ -0.99296874.
    code = dynamic_code()
    assert code.shape == (256,) and torch.all(code[1:] >= code[:-1])
    assert code[127] == 0 and code[255] == 1
    assert abs(float(code[0]) + 0.99296874) < 1e-7
    assert abs(float(code[code > 0].min()) - 5.5e-7) < 1e-9


@pytest.mark.peer
def test_codes_equal_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.testing.assert_close(nf4_code(), functional.get_4bit_type("nf4", "cpu")[:16], atol=2e-7, rtol=0)
    torch.testing.assert_close(dynamic_code(), functional.create_dynamic_map(True), atol=0, rtol=0)
