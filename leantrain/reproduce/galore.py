"""GaLore: gradient low-rank projection vs full-rank AdamW (Zhao et al. 2024, https://arxiv.org/abs/2403.03507)."""
from __future__ import annotations

from .finetune_pair import acc, pct, run_pair

PAPER = "GaLore, Zhao et al. 2024, https://arxiv.org/abs/2403.03507"


def compare(rows):
    full, galore = rows
    comparison = [
        ("optimizer state reduction vs Adam", "up to 65.5 %",
         pct(galore["optimizer_state_bytes"], full["optimizer_state_bytes"])),
        ("quality vs full-rank Adam", "60M LLaMA C4 val ppl 34.88 vs 34.06 (slightly worse)",
         f"GaLore {acc(galore)} vs AdamW {acc(full)} val acc; val loss {galore['val_loss']:.4f} vs "
         f"{full['val_loss']:.4f}"),
    ]
    explanation = ("GaLore projects only the 2-D weight matrices (rank 8 here vs 128-512 in the paper); embeddings, "
                   "norms and the head keep full Adam states, so the reduction depends on that share. The paper "
                   "pre-trains LLaMA on C4; we fine-tune an encoder for 30 steps, so only the memory ratio and the "
                   "direction of the quality gap carry over.")
    return comparison, explanation


def run(out, work, quick=False, progress=True):
    return run_pair("galore", title="AdamW vs GaLore-AdamW (full fine-tune, rank 8, gap 10)", paper=PAPER,
                    runs=[("full adamw", {"method": "full", "optim": "adamw"}),
                          ("full galore-adamw", {"method": "full", "optim": "galore-adamw", "rank": 8, "gap": 10})],
                    out=out, work=work, quick=quick, progress=progress, compare=compare)
