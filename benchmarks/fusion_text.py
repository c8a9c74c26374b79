"""Multi-adapter fusion on real text: concept loss of SHiRA vs LoRA adapters of equal size on the embedded MiniLM.

Paper claim (Bhardwaj et al., *Rapid Switching and Multi-Adapter Fusion via Sparse High Rank Adapters*,
https://arxiv.org/abs/2407.16712): fusing several SHiRA adapters loses less of each adapter's task quality
("concept loss") than fusing LoRA adapters. ``benchmarks/fusion.py`` tests this on a synthetic MLP; this script
uses the bundled text tasks and leantrain's own data/model/training code (``ClassificationTask``, the
``leantrain train`` method builders, and the pieces of ``leantrain.run`` / ``leantrain.loop`` a multi-adapter
setup can share: calibration batches, the head group and its lr rule, the optimizer, the schedule and the training
closure), offline.

Per seed: one frozen encoder (MiniLM), one task per data set (default: "vader" 3-class sentiment, "bible"
7-class KJV division), each with its own fresh linear head. For each method an adapter is trained per task
together with that task's head (the other adapter inactive), then every task is evaluated with its own head
  (1) head only on the base encoder (a head trained on the frozen base, no adapter),
  (2) its own adapter alone,
  (3) all adapters fused into the base weights (``adapters.merge(encoder, names)``; SHiRA: in-place scatter of
      the K entries of each adapter, LoRA: both ΔW = s·BA added), then ``unmerge`` (checked to restore W).
concept loss = acc(alone) - acc(fused).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion_text.py [--quick] [--json PATH] [--seeds 3]
        [--methods shira,lora,shira-snip] [--steps 100] [--train-size 2000] [--val-size 500] [--lr LR]

The defaults are ``leantrain.experiments.definitions.FUSION`` and ``SEEDS`` (lr 2e-3, 3 seeds): with no options this
trains exactly the fusion runs of ``leantrain reproduce shira``.
    .venv/bin/python benchmarks/fusion_text.py --from-json a.json b.json   # pool seeds of earlier runs, re-plot
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leantrain.experiments.definitions import FUSION, SEEDS
from leantrain.reproduce.fusion import METHODS, fusion_config, run_seed, summarise, table


def plot(rows: list[dict], data: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data) + 1, figsize=(4.2 * (len(data) + 1), 3.6))
    width = 0.8 / len(rows)
    for t, name in enumerate(data):
        ax = axes[t]
        for k, r in enumerate(rows):
            xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(3)]
            ax.bar(xs, [r["head_only"][t], r["alone"][t], r["fused"][t]], width, label=r["method"])
        ax.set_xticks(range(3), ["head only", "alone", "fused"])
        ax.set_ylabel("val accuracy")
        ax.set_title(name)
        low = min(min(r["head_only"][t], r["fused"][t]) for r in rows)
        ax.set_ylim(max(0.0, low - 0.1), None)
    ax = axes[-1]
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(data) + 1)]
        ax.bar(xs, r["concept_loss"] + [r["concept_loss_mean"]], width, label=r["method"])
    ax.set_xticks(range(len(data) + 1), list(data) + ["mean"])
    ax.set_ylabel("concept loss = alone - fused")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=FUSION["model"], help="minilm (default) or tiny (random 2-layer BERT)")
    ap.add_argument("--data", default=FUSION["data"], help="comma-separated data sets, one adapter each")
    ap.add_argument("--methods", default=FUSION["methods"], help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--rank", type=int, default=FUSION["rank"], help="LoRA rank; SHiRA K = rank*(out+in) per layer")
    ap.add_argument("--steps", type=int, default=FUSION["steps"])
    ap.add_argument("--batch-size", type=int, default=FUSION["batch_size"])
    ap.add_argument("--train-size", type=int, default=FUSION["train_size"])
    ap.add_argument("--val-size", type=int, default=FUSION["val_size"])
    ap.add_argument("--max-length", type=int, default=FUSION["max_length"])
    ap.add_argument("--lr", type=float, default=FUSION["lr"],
                    help="adapter lr (default %(default)g; leantrain's per-method default is 5e-4); the head trains at "
                    "max(lr, 1e-3) as in `leantrain train`, the head-only baseline at the head method's 2e-3")
    ap.add_argument("--seeds", type=int, default=len(SEEDS),
                    help="number of seeds (head/adapter init, masks, batch order; default: the definition's)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20 steps, 256/128 sentences (checks the pipeline)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "fusion_text.png"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="PATH",
                    help="no training: pool the seeds of earlier --json files (same setup) and report/plot them")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.train_size, args.val_size = 20, 256, 128
    try:
        cfg, data, labels = fusion_config(vars(args), progress=not args.no_progress)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    started = time.time()
    if args.from_json:
        runs, labels, data = pooled_runs(args)
    else:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        runs = [run_seed(replace(cfg, seed=s), data, labels)
                for s in tqdm(seeds, desc="seeds", disable=args.no_progress or args.seeds == 1)]
    wall = time.time() - started
    rows = summarise(runs, labels, data)
    setup = (f"{args.model}, rank {args.rank}, {args.steps} steps x batch {args.batch_size}, "
             f"{args.train_size} train / {args.val_size} val per task, seed(s) "
             f"{', '.join(str(r['seed']) for r in runs)}{'' if args.lr is None else f', lr {args.lr:g}'}")
    took = f"pooled from {len(args.from_json)} file(s)" if args.from_json else f"{wall / 60:.1f} min"
    print(f"\nFusion of {len(data)} adapters ({setup}); val accuracy; {took}")
    print(table(rows, data))
    for r in rows:
        extra = f", mask overlap {r['mask_overlap']:.4f}" if r["mask_overlap"] is not None else ""
        per_seed = " ".join(f"{statistics.mean(run['methods'][r['method']]['concept_loss']):.3f}" for run in runs)
        print(f"{r['method']}: mean concept loss per seed {per_seed}; unmerge restored W exactly: "
              f"{r['restored_exact']} (max error {r['restore_max_error']:.2e}){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": vars(args), "wall_seconds": wall, "rows": rows,
                                               "runs": runs}, indent=2) + "\n")
    if args.plot:
        plot(rows, data, Path(args.plot), f"Fusion concept loss: {setup}")
    return 0


def pooled_runs(args: argparse.Namespace) -> tuple[list[dict], list[str], list[str]]:
    """Runs of several --json files whose setups agree except for the seeds (their setup replaces ``args``'s)."""
    ignore = {"seeds", "first_seed", "json", "plot", "no_progress", "threads", "from_json"}
    runs, first = [], None
    for path in args.from_json:
        saved = json.loads(Path(path).read_text())
        setup = {k: v for k, v in saved["setup"].items() if k not in ignore}
        if first is None:
            first = setup
        elif setup != first:
            diff = sorted(k for k in set(setup) | set(first) if setup.get(k) != first.get(k))
            raise SystemExit(f"--from-json: {path} differs from {args.from_json[0]} in {diff}")
        runs += saved["runs"]
    for key, value in first.items():
        setattr(args, key, value)
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--from-json: seed(s) repeated across files: {seeds}")
    labels = [m for m in args.methods.split(",") if m]
    return runs, labels, args.data.split(",")


if __name__ == "__main__":
    sys.exit(main())
