"""MiSS (Bone): block-shard adapter vs LoRA at the same rank (arXiv 2409.15371)."""
from __future__ import annotations

from .finetune_pair import Comparison, Rows, acc, pair_runner

PAPER = "MiSS / Bone, Kang et al., https://arxiv.org/abs/2409.15371"
TITLE = "MiSS vs LoRA (rank 8, all linear layers)"
RUNS = [("lora r8", {"method": "lora", "rank": 8}), ("miss r8", {"method": "miss", "rank": 8})]
PLOT = ("trainable_params", "trainable params (M)")  # the second bar panel


def compare(rows: Rows) -> Comparison:
    """The paper-vs-ours rows and the sentence on any difference."""
    lora, miss = rows
    comparison = [
        ("accuracy, MiSS vs LoRA", "MiSS ≥ LoRA on LLaMA2-7B fine-tuning (qualitative; spec has no verified number)",
         f"MiSS {acc(miss)} vs LoRA {acc(lora)}"),
        ("trainable params, MiSS / LoRA", "fewer than LoRA at equal r (r·out vs r·(in+out))",
         (f"{miss['trainable_params']:,} / {lora['trainable_params']:,} = "
          f"{miss['trainable_params'] / lora['trainable_params']:.2f}")),
        ("time per step, MiSS / LoRA", "faster than LoRA (paper's efficiency claim)",
         f"{miss['sec_per_step'] / lora['sec_per_step']:.2f}x"),
    ]
    explanation = ("The paper fine-tunes 7B LLMs on math/code/commonsense benchmarks; here a 22M-parameter encoder "
                   "is tuned for 30 steps on a 3-class sentiment task, so only the direction of the accuracy "
                   "difference is comparable. Both runs include the fresh classification head in the trainable "
                   "count, and step time on a shared 2-core machine is noisy.")
    return comparison, explanation


run = pair_runner(__name__)
