"""One intra-op thread for the quant tests: on the shared, overloaded CI box OpenMP barriers made tiny SVDs
take ~1.4 s each with 2 threads (2.5 ms with 1). The tensors here are small, so one thread loses nothing."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
