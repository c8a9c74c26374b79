"""GradNormLoRP vs LoRA and full fine-tuning (Huang et al. 2024, https://arxiv.org/abs/2412.19616)."""
from __future__ import annotations

from .finetune_pair import Comparison, Rows, acc, pair_runner, pct

PAPER = "GradNormLoRP, Huang et al. 2024, https://arxiv.org/abs/2412.19616"
TITLE = "Full AdamW vs LoRA vs GradNormLoRP (rank 8)"
RUNS = [("full adamw", {"method": "full", "optim": "adamw"}),
        ("lora r8", {"method": "lora", "rank": 8}),
        ("gradnormlorp r8", {"method": "gradnormlorp", "rank": 8, "gap": 10})]


def compare(rows: Rows) -> Comparison:
    """The paper-vs-ours rows and the sentence on any difference."""
    full, lora, gnl = rows
    comparison = [
        ("accuracy vs LoRA (rank 8)", "GLUE avg 80.65 vs LoRA 79.23 (RoBERTa)", f"{acc(gnl)} vs LoRA {acc(lora)}"),
        ("optimizer memory reduction vs full Adam", "up to 89.5 % (8-bit variant)",
         pct(gnl["optimizer_state_bytes"], full["optimizer_state_bytes"]) + " (32-bit states)"),
    ]
    explanation = ("Memory: the unprojected word-embedding matrix (30522 x 384 = 11.7 M of MiniLM's 22.6 M "
                   "parameters) keeps full 32-bit Adam states (~89 MiB), which alone bounds the reduction near 50 %; "
                   "the paper's 89.5 % uses 8-bit low-rank moments on LLaMA, whose matrices dominate the parameter "
                   f"count. Accuracy: ours is {100 * (gnl['val_accuracy'] - lora['val_accuracy']):+.2f} points vs "
                   "LoRA, while the paper reports +1.42 (GLUE); with 30 steps, one seed, no lr/gap tuning for this "
                   "task and ~160 validation sentences (one sentence ≈ 0.6 points) we cannot tell that apart from "
                   "noise, so this run neither confirms nor contradicts the paper's accuracy claim.")
    return comparison, explanation


run = pair_runner(__name__)
