"""leantrain.optim.arith: the closed-form codec of the built-in maps is bit-identical to the table codec.

Differential: every code decodes to the table's float32 value; nearest == bucketize over the midpoints (the
definition, incl. positive_floor) == the 16-bit lookup of quant.CodeTable, on every midpoint and its float
neighbours, +-0, subnormals, values beyond [-1, 1], every decade and millions of random values.
"""
from __future__ import annotations

import pytest
import torch

from leantrain.optim import arith, quant
from leantrain.optim.codecs import get_codec

MAPS = {"d8s": quant.dynamic_map(True), "d8u": quant.dynamic_map(False), "d4s": quant.dynamic_map(True, 3, 4),
        "lin4u": quant.linear_map(4, signed=False)}


def _lookup(code: torch.Tensor, positive_floor: bool, s: torch.Tensor) -> torch.Tensor:
    """The 16-bit table lookup of quant.CodeTable, with any closed form switched off."""
    table = quant.CodeTable(code, positive_floor)
    table.formula = None
    assert table.fast
    return table.nearest(s.contiguous()).long()


def _check(name: str, positive_floor: bool, s: torch.Tensor) -> None:
    code = MAPS[name]
    got = arith.for_code(code).nearest(s.contiguous(), positive_floor).long()
    want = torch.bucketize(s, quant._midpoints(code, positive_floor))
    bad = (got != want).nonzero().flatten()[:5]
    assert bad.numel() == 0, f"{name}: s={s[bad].tolist()} got {got[bad].tolist()} want {want[bad].tolist()}"
    assert torch.equal(got, _lookup(code, positive_floor, s))


@pytest.mark.parametrize("name", MAPS)
def test_decode_every_code(name):
    code = MAPS[name]
    got = arith.for_code(code).decode(torch.arange(code.numel(), dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), code.view(torch.int32))  # bit for bit (also the sign of 0)


@pytest.mark.parametrize("positive_floor", [False, True])
@pytest.mark.parametrize("name", MAPS)
def test_nearest_on_edges(name, positive_floor):
    code = MAPS[name]
    mids = quant._midpoints(code, positive_floor)
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    edges = torch.cat([code, mids, torch.nextafter(mids, up), torch.nextafter(mids, down),
                       torch.nextafter(code, up), torch.nextafter(code, down)])
    special = torch.tensor([0.0, 1e-45, 2e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 1e-30, 1e-8, 1.0,
                            float(torch.nextafter(torch.tensor(1.0), up)), 1.5, 2.0, 1e30, 3.4e38])
    g = torch.Generator().manual_seed(0)
    decades = torch.cat([(1 + 9 * torch.rand(2000, generator=g)) * 10.0**d for d in range(-9, 1)])
    s = torch.cat([edges, special, decades])
    _check(name, positive_floor, torch.cat([s, -s]))  # -s includes -0.0 and values below -1


@pytest.mark.parametrize("positive_floor", [False, True])
@pytest.mark.parametrize("name", MAPS)
def test_nearest_on_millions_of_random_values(name, positive_floor):
    g = torch.Generator().manual_seed(1)
    n = 1 << 20
    u = torch.rand(n, generator=g) * 2 - 1
    s = torch.cat([u, u**5, u.sign() * torch.exp(-17 * torch.rand(n, generator=g))])  # dense near 0, log-uniform
    if name in ("d8u", "lin4u"):
        s = s.abs()
    for part in s.split(1 << 20):
        _check(name, positive_floor, part)


def test_only_builtin_maps_have_a_form():
    assert arith.for_code(MAPS["d8s"]) == arith.DynamicMap(7, 0)
    assert arith.for_code(MAPS["d8u"]) == arith.DynamicMap(7, 1)
    assert arith.for_code(quant.linear_map(4, signed=True)) is None
    assert arith.for_code(MAPS["d8s"] * 0.5) is None
    assert arith.for_code(MAPS["d8s"][:-1]) is None


def test_codecs_use_a_form_only_where_it_was_measured_faster():
    """The dynamic maps' exact closed form is far slower than the lookup (module docstring): tables stay."""
    for name in ("8bit", "4bit"):
        assert get_codec(name, True).table.formula is None
    assert get_codec("8bit", False).table.formula is None
    assert isinstance(get_codec("4bit", False).table.formula, arith.Linear16)
    assert quant.CodeTable(torch.tensor([-1.0, 0.0, 1.0])).formula is None
