"""Reproduce the GaLore paper's memory estimates (Zhao et al. 2024, arXiv 2403.03507).

Expected values are the paper's published numbers as quoted in /work/shared/methods/galore_gradnormlorp.md
(Table 2: "memory estimate of parameters + optimizer states in BF16"), never values produced by leantrain.
The paper's "G" is GiB: the 350M full-rank cell pins it (367,969,280 parameters × 6 bytes = 2.056 GiB, the
paper prints 2.06G; in decimal GB it would be 2.21).

Our estimator follows the paper's own Table 1 accounting (full Adam: weights + 2 moments; GaLore: mr + 2nr per
m×n matrix, m ≤ n, on every attention/MLP Linear; embeddings, norms and lm_head keep dense Adam). With the
GaLore repository's configs (configs/llama_*.json) that reproduces 4 of the 8 cells within 5 %. The other 4
cannot be reached by any single consistent accounting (see docs/memory.md for the alternatives tried): they
are marked xfail(strict) with the deviation we compute, so the test fails loudly if that ever changes.
"""
from __future__ import annotations

import pytest

from leantrain.memory import estimate, model_spec

GIB = 2**30
SIZES = ["llama-60m", "llama-130m", "llama-350m", "llama-1b"]
RANKS = {"llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512}  # Table 2, "r / d_model" row
PAPER_GIB = {  # Table 2, memory column, as quoted in the spec
    ("full", "llama-60m"): 0.36, ("full", "llama-130m"): 0.76, ("full", "llama-350m"): 2.06, ("full", "llama-1b"): 7.80,
    ("galore", "llama-60m"): 0.24, ("galore", "llama-130m"): 0.52, ("galore", "llama-350m"): 1.22,
    ("galore", "llama-1b"): 4.38,
}
# Cells the paper's accounting does not let us reproduce within 5 % (our relative deviation in the reason).
KNOWN_OFF = {
    ("full", "llama-60m"): "0.325 GiB vs 0.36 (-9.9 %): 58.07M params x 6 B; 0.36 would need 64M params",
    ("galore", "llama-60m"): "0.261 GiB vs 0.24 (+8.6 %)",
    ("galore", "llama-130m"): "0.569 GiB vs 0.52 (+9.5 %)",
    ("galore", "llama-350m"): "1.293 GiB vs 1.22 (+6.0 %)",
}


def _paper_memory(method: str, size: str) -> float:
    r = estimate(size, method=method, optim="adamw", dtype="bf16", rank=RANKS[size], batch_size=1, seq_len=1,
                 moments="param")  # the paper counts Adam's moments in bf16
    return (r.weights + r.optimizer_states) / GIB  # the table's convention: no gradients, no activations


def _cases():
    for key in PAPER_GIB:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_OFF[key])] if key in KNOWN_OFF else []
        yield pytest.param(*key, marks=marks, id=f"{key[0]}-{key[1]}")


@pytest.mark.parametrize("method,size", list(_cases()))
def test_galore_table2_within_5_percent(method: str, size: str) -> None:
    ours = _paper_memory(method, size)
    assert ours == pytest.approx(PAPER_GIB[(method, size)], rel=0.05)


@pytest.mark.parametrize("size", SIZES)
def test_galore_below_full_rank_at_every_size(size: str) -> None:
    # The paper's ratio GaLore/full ranges 0.56-0.68 (not monotone in size); ours must at least save memory.
    assert PAPER_GIB[("galore", size)] < PAPER_GIB[("full", size)]
    assert _paper_memory("galore", size) < 0.85 * _paper_memory("full", size)


def test_parameter_counts_of_galore_configs() -> None:
    # Hand count from configs/llama_1b.json: 24 x (4·2048² + 3·2048·5461 + 2·2048) + 2·32000·2048 + 2048.
    h, f, layers, vocab = 2048, 5461, 24, 32000
    expected = layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * vocab * h + h
    assert model_spec("llama-1b").num_params == expected == 1_339_082_752
    assert model_spec("llama-7b").num_params == 6_738_415_616  # LLaMA-7B's well-known count


def test_llama7b_8bit_recalled_numbers() -> None:
    # Spec A.5 (recalled from the paper, weights + states in GiB-like "GB"): 8-bit Adam ~26, 8-bit GaLore ~18.
    adam8 = estimate("llama-7b", method="full", optim="adamw8bit", dtype="bf16", moments="param")
    gal8 = estimate("llama-7b", method="galore-8bit", optim="adamw8bit", dtype="bf16", rank=1024, moments="param")
    assert (adam8.weights + adam8.optimizer_states) / GIB == pytest.approx(26, rel=0.05)
    assert (gal8.weights + gal8.optimizer_states) / GIB == pytest.approx(18, rel=0.05)


def test_table1_formulas_for_one_matrix() -> None:
    """Paper Table 1 for one m×n weight (m ≤ n), bf16: GaLore states mr + 2nr; LoRA weights mn + mr + nr and
    states 2mr + 2nr; full Adam 2mn. Built as a one-Linear model so nothing else contributes."""
    from leantrain.memory import ModelSpec, ParamSpec

    m, n, r = 64, 96, 8  # weight (out=m, in=n), m <= n
    spec = ModelSpec("one", [ParamSpec("lin.weight", (m, n), "lin", "linear")], hidden=m, layers=1, heads=1,
                     intermediate=m)
    e = 2
    full = estimate(spec, "full", "adamw", "bf16", rank=r, moments="param")
    gal = estimate(spec, "galore", "adamw", "bf16", rank=r, moments="param")
    lora = estimate(spec, "lora", "adamw", "bf16", rank=r, moments="param")
    step = 4  # one fp32 step counter per optimized tensor
    assert full.optimizer_states == 2 * m * n * e + step
    assert gal.optimizer_states == (m * r + 2 * n * r) * e + step
    assert lora.weights == (m * n + m * r + n * r) * e
    assert lora.optimizer_states == (2 * m * r + 2 * n * r) * e + 2 * step


def test_trainer_moments_are_fp32_for_bf16_weights() -> None:
    """leantrain's AdamW keeps fp32 moments for bf16 parameters (the trainer), the paper counts them in bf16."""
    trainer = estimate("llama-60m", "full", "adamw", "bf16")
    paper = estimate("llama-60m", "full", "adamw", "bf16", moments="param")
    n = model_spec("llama-60m").num_params
    assert trainer.optimizer_states - paper.optimizer_states == 2 * n * (4 - 2)
