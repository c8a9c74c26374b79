"""Benchmark: dense MLP vs DLRT (rank-adaptive KLS, plain SGD) at several τ on scikit-learn's bundled digits.

    .venv/bin/python benchmarks/dlrt.py [--quick] [--json [PATH]] [--png-dir docs/img] [--repeats N]

Reports test accuracy, inference parameters, compression (1 − params/dense), training seconds per epoch and the
final ranks of the three hidden layers of a 64-500-500-500-10 MLP (the output layer stays dense). With ``--seeds``
> 1 accuracy/time are means over seeds (each seed = a different split and init). The defaults are
``leantrain.experiments.definitions.DIGITS`` / ``DIGITS_TAUS`` / ``SEEDS`` and the runs are
``leantrain.reproduce.dlrt.digits_runs``: with no options this is exactly ``leantrain reproduce dlrt``. With ``--json`` the last stdout
line is the JSON list of rows {"method", "tau", "accuracy", "params", "ranks", "sec_per_epoch", ...}.
Goals (issue 8): ≥ 90 % fewer parameters at ≤ 1 point accuracy loss, time per step ≤ 2x dense.
Paper: Schotthöfer et al. 2022, https://arxiv.org/abs/2205.13571.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from leantrain.experiments.definitions import DIGITS, DIGITS_TAUS, SEEDS
from leantrain.lowrank.digits import load_digits_split, plot_results, table
from leantrain.reproduce.dlrt import digits_runs, pool_seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (3 epochs, 2 τ) for smoke tests")
    p.add_argument("--taus", default=",".join(map(str, DIGITS_TAUS)))
    p.add_argument("--epochs", type=int, default=DIGITS["epochs"])
    p.add_argument("--batch-size", type=int, default=DIGITS["batch_size"])
    p.add_argument("--lr", type=float, default=DIGITS["lr"])
    p.add_argument("--momentum", type=float, default=DIGITS["momentum"])
    p.add_argument("--start-rank", type=int, default=DIGITS["start_rank"])
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--repeats", type=int, default=1,
                   help="run dense and every τ this many times in turn (same seed) and report the median s/epoch: "
                        "the methods alternate, so load from other jobs hits them alike")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = fair timing on a shared machine)")
    p.add_argument("--png-dir", default=None, help="write dlrt_*.png here (e.g. docs/img)")
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="print the rows as JSON on the last stdout line (and write them to PATH if given)")
    args = p.parse_args(argv)
    taus = [float(t) for t in args.taus.split(",")]
    if args.quick:
        args.epochs, taus, args.seeds = 3, taus[:2], 1
    torch.set_num_threads(args.threads)
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
                "start_rank": args.start_rank}
    with tqdm(total=args.repeats * args.seeds * args.epochs * (1 + len(taus)), unit="epoch", desc="dlrt bench",
              file=sys.stderr) as bar:
        rows = pool_seeds(digits_runs(taus, range(args.seeds), settings, bar, args.repeats))
    data = load_digits_split(0)
    print(f"digits, MLP {list(data[0].shape)} train / {len(data[2])} test, {args.epochs} epochs, batch "
          f"{args.batch_size}, SGD lr {args.lr} momentum {args.momentum}, start rank {args.start_rank}, "
          f"{args.seeds} seed(s), {args.threads} thread(s), median of {args.repeats} alternating repeat(s); "
          f"load {os.getloadavg()}")
    print(table(rows))
    if args.png_dir:
        for path in plot_results(rows, args.png_dir):
            print(f"wrote {path}")
    slim = [{k: v for k, v in r.items() if k != "rank_history"} for r in rows]
    if args.json:
        text = json.dumps(slim)
        if args.json != "-":
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
