"""Fixtures shared by the adapter tests (modules cannot import each other under --import-mode=importlib)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


class Net(nn.Module):
    """Three Linears (12 -> 24 -> 16 -> 3), the last named like a task head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.classifier = nn.Linear(12, 24), nn.Linear(24, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


@pytest.fixture
def linear_net() -> Callable[[], tuple[Net, torch.Tensor, torch.Tensor]]:
    """make() -> (a seeded Net, inputs (4, 7, 12), class labels (4, 7)): the same tensors on every call."""
    def make() -> tuple[Net, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        return Net(), torch.randn(4, 7, 12), torch.randint(0, 3, (4, 7))

    return make
