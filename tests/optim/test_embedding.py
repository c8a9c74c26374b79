"""StableEmbedding: Xavier init, LayerNorm output, 32-bit optimizer state; bnb differential."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leantrain.optim import AdamW8bit, StableEmbedding


def test_init_and_forward():
    torch.manual_seed(0)
    emb = StableEmbedding(1000, 64, padding_idx=0)
    bound = math.sqrt(6 / (1000 + 64))  # Xavier uniform
    assert float(emb.weight.detach().abs().max()) <= bound
    assert float(emb.weight.detach()[1:].std()) > 0.5 * bound / math.sqrt(3)
    assert torch.equal(emb.weight[0], torch.zeros(64))
    out = emb(torch.tensor([[1, 2, 3], [4, 5, 0]]))
    assert out.shape == (2, 3, 64)
    ref = nn.functional.layer_norm(emb.weight[torch.tensor([[1, 2, 3], [4, 5, 0]])], (64,),
                                   emb.norm.weight, emb.norm.bias)
    assert torch.allclose(out, ref, atol=1e-6)


def test_bf16_weight_output_dtype():
    emb = StableEmbedding(50, 16, dtype=torch.bfloat16)
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16


def test_weight_gets_32bit_state_but_group_key_wins():
    emb = StableEmbedding(1000, 64)
    lin = nn.Linear(64, 128)
    opt = AdamW8bit(list(emb.parameters()) + list(lin.parameters()))
    loss = lin(emb(torch.randint(0, 1000, (8, 5)))).square().mean()
    loss.backward()
    opt.step()
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in opt.state[emb.weight]
    assert opt.state[lin.weight]["exp_avg_codes"].dtype == torch.uint8
    opt2 = AdamW8bit([{"params": [emb.weight], "codec": "8bit"}])
    opt2.step()
    assert opt2.state[emb.weight]["exp_avg_codes"].dtype == torch.uint8


@pytest.mark.peer
def test_against_bitsandbytes_stable_embedding():
    bnb = pytest.importorskip("bitsandbytes")
    ours = StableEmbedding(100, 32)
    theirs = bnb.nn.StableEmbedding(100, 32)
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 100, (4, 7))
    assert torch.allclose(ours(idx), theirs(idx), atol=1e-6)
