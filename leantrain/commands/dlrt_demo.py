"""``leantrain dlrt-demo``: dense MLP vs DLRT (rank-adaptive KLS) at a few τ on scikit-learn's bundled digits.

Offline (load_digits ships with scikit-learn). Prints a table (accuracy, parameters, compression, time per epoch,
final ranks) and writes ``results.json``, ``dlrt_rank_vs_step.png`` and ``dlrt_accuracy_vs_compression.png``
to ``--out``. Paper: Schotthöfer et al. 2022, https://arxiv.org/abs/2205.13571.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import write_text_atomic


def _taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--taus {text!r}: not a comma-separated list of numbers") from exc
    bad = [t for t in taus if not t > 0]
    if not taus or bad:
        raise argparse.ArgumentTypeError(f"--taus {text!r}: every τ must be > 0 (got {bad or 'none'})")
    return taus


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--widths {text!r}: not a comma-separated list of ints") from exc
    if len(widths) < 3 or widths[0] != 64 or widths[-1] != 10 or min(widths) < 2:
        raise argparse.ArgumentTypeError(f"--widths {text!r}: need 64,<hidden...>,10 with every width >= 2")
    return widths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--taus", type=_taus, default=[0.05, 0.1, 0.2], help="comma-separated truncation tolerances")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (dense and DLRT)")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--start-rank", type=int, default=32, help="initial rank of each hidden layer")
    p.add_argument("--widths", type=_widths, default=(64, 500, 500, 500, 10),
                   help="MLP layer widths; every hidden Linear becomes low-rank, the last stays dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dlrt-demo", help="folder for results.json and the PNG plots")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def register(subparsers) -> None:
    p = subparsers.add_parser("dlrt-demo", help="dense MLP vs DLRT low-rank training on the bundled digits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run_experiment(args: argparse.Namespace) -> list[dict]:
    """Train dense then DLRT at each τ on one split; rows as in ``leantrain.lowrank.digits.train_run``."""
    from tqdm import tqdm

    from ..lowrank.digits import load_digits_split, train_run

    for name in ("epochs", "batch_size", "start_rank"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr} must be > 0")
    data = load_digits_split(args.seed)
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
              "seed": args.seed, "data": data, "widths": args.widths}
    rows = []
    with tqdm(total=args.epochs * (1 + len(args.taus)), desc="dlrt-demo", unit="epoch",
              disable=not args.progress) as bar:
        bar.set_postfix_str("dense")
        rows.append(train_run("dense", None, progress=bar, **common))
        for tau in args.taus:
            bar.set_postfix_str(f"dlrt τ={tau}")
            rows.append(train_run("dlrt", tau, start_rank=args.start_rank, progress=bar, **common))
    return rows


def run(args: argparse.Namespace) -> int:
    from ..lowrank.digits import plot_results, table

    rows = run_experiment(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(table(rows))
    write_text_atomic(out / "results.json", json.dumps(rows, indent=1))
    for path in plot_results(rows, out):
        print(f"wrote {path}")
    return 0
