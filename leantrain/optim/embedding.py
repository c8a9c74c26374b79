"""StableEmbedding: Xavier-initialised embedding + LayerNorm whose weight keeps 32-bit optimizer state.

Paper: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, ICLR 2022, sec. 2.3,
https://arxiv.org/abs/2110.02861 -- needed for stable 8-bit training of language models: token gradients are
sparse and very non-uniform, which 8-bit states of the embedding handle badly.

Instead of bitsandbytes' global override manager, the weight carries ``optim_bits = 32``; leantrain's
optimizers read that attribute when the param group sets neither ``codec`` nor ``optim_bits``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class StableEmbedding(nn.Embedding):
    """``LayerNorm(Embedding(x))`` with Xavier-uniform init; the output is cast back to the weight dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                         _weight=_weight, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embedding_dim, device=device)
        self.weight.optim_bits = 32  # read by BlockOptimizer.codec_name: 32-bit Adam state for this tensor

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: Tensor) -> Tensor:
        emb = super().forward(input)
        # LayerNorm in the default dtype (fp32) for stability, then back to the weight dtype
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)
