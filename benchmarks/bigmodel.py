"""Peak RSS and s/step of LLaMA pre-training recipes per model size, the pre-flight estimate beside each.

    .venv/bin/python benchmarks/bigmodel.py [--sizes 60m,130m,350m] [--recipes all] [--steps 3] [--json PATH]

Each (size, recipe) runs ``leantrain train --task causal-lm --init-weights scratch`` in its own child process on
the bible corpus (batch 1 x 256 tokens, --val-size 4) and reads the child's ``metrics.json``: the measured
``peak_rss_bytes`` (the child's own VmHWM), ``estimated_peak_bytes`` (leantrain/preflight.py) and s/step of the
loop (the first step includes GaLore's first projector refresh, so steps 2.. are timed separately from the log's
timestamps where available). A size whose estimate exceeds ``--budget`` (default: available RAM) is not run; the
table then shows the estimate only. Run one at a time on a quiet machine; the big sizes need most of the RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES: dict[str, list[str]] = {
    "adamw-fp32": ["--optim", "adamw", "--dtype", "fp32"],
    "adamw-bf16": ["--optim", "adamw", "--dtype", "bf16"],
    "adamw8bit-bf16": ["--optim", "adamw8bit", "--dtype", "bf16"],
    "galore8bit-bf16-layerwise-ckpt": ["--optim", "galore-adamw8bit", "--dtype", "bf16", "--layerwise",
                                       "--activation-checkpointing"],
    "lora-nf4-bf16": ["--optim", "adamw", "--dtype", "bf16", "--method", "lora", "--quantize", "nf4", "--lr", "1e-3"],
}
GALORE_RANK = {"nano": 8, "tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}  # the paper's
GIB = 2**30


def rank_of(size: str, recipe: str) -> int:
    """GaLore's rank for the size (the paper's); LoRA keeps r = 8."""
    return GALORE_RANK.get(size, 128) if recipe.startswith("galore") else 8


def command(size: str, recipe: str, steps: int, out: Path, return_freed: bool = False) -> list[str]:
    freed = ["--return-freed-memory"] if return_freed else []
    return [sys.executable, "-m", "leantrain", "train", "--task", "causal-lm", "--init-weights", "scratch",
            "--preset", size, "--method", "full", "--data", "bible", "--batch-size", "1", "--max-length", "256",
            "--steps", str(steps), "--val-size", "4", "--rank", str(rank_of(size, recipe)), "--no-progress",
            "--out", str(out), "--overwrite", *RECIPES[recipe], *freed]


def estimate_only(size: str, recipe: str) -> int:
    from leantrain.config import TrainConfig
    from leantrain.preflight import predicted_bytes

    args = RECIPES[recipe]
    flags = {"optim": args[1], "dtype": args[3], "layerwise": "--layerwise" in args,
             "activation_checkpointing": "--activation-checkpointing" in args}
    if "--method" in args:
        flags.update(method=args[args.index("--method") + 1], quantize=args[args.index("--quantize") + 1],
                     lr=float(args[args.index("--lr") + 1]))
    cfg = TrainConfig(task="causal-lm", init_weights="scratch", preset=size, batch_size=1, max_length=256,
                      rank=rank_of(size, recipe), **{"method": "full", **flags})
    return predicted_bytes(cfg, "cpu")


def run_one(size: str, recipe: str, steps: int, budget: int, return_freed: bool = False) -> dict:
    row = {"size": size, "recipe": recipe, "estimate_gib": round(estimate_only(size, recipe) / GIB, 2),
           "return_freed_memory": return_freed}
    if row["estimate_gib"] * GIB > budget:
        return {**row, "note": "estimate over budget: not run"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.run(command(size, recipe, steps, out, return_freed), capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        if proc.returncode != 0:
            return {**row, "note": f"failed: {proc.stderr.strip().splitlines()[-1][:200]}"}
        m = json.loads((out / "metrics.json").read_text())
    peak = m["peak_rss_bytes"]
    return {**row, "estimate_gib": round(m["estimated_peak_bytes"] / GIB, 2), "peak_rss_gib": round(peak / GIB, 2),
            "estimate_over_measured": round(m["estimated_peak_bytes"] / peak, 3),
            "s_per_step": round(m["sec_per_step"], 2), "train_loss_last": m.get("train_loss_last")}


def main() -> None:
    from leantrain.preflight import available_bytes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60m,130m,350m")
    ap.add_argument("--recipes", default="all")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-gib", type=float, default=None, help="skip runs estimated above this (default: "
                                                                    "available RAM)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--return-freed-memory", action="store_true",
                    help="pass --return-freed-memory to every run (RSS then follows the live tensors)")
    args = ap.parse_args()
    recipes = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    budget = int(args.budget_gib * GIB) if args.budget_gib else available_bytes("cpu")
    rows = []
    for size in args.sizes.split(","):
        for recipe in recipes:
            rows.append(run_one(size, recipe, args.steps, budget, args.return_freed_memory))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
