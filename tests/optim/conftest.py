"""Shared fixtures of the optimizer tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add contention on the shared 2-core test machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trajectory(make, shapes, steps: int = 100) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
    """Parameters of ``shapes`` and then ``steps`` gradients, all drawn from one generator seeded 0, stepped by
    ``make(params)``: the same inputs for an optimizer and its reference. Returns (start values, parameters)."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return start, params


@pytest.fixture
def trajectory():
    """``trajectory(make, shapes, steps=100) -> (start, params)`` (see ``_trajectory``)."""
    return _trajectory
