"""``leantrain reproduce NAME``: run a small offline version of a paper's headline experiment.

Writes ``<out>/<name>/README.md`` (paper vs ours) and ``<out>/<name>/<name>.png``; training runs go to
``--work`` (one process each, through the experiment engine) and are reused across experiments and invocations
when their config hash matches. ``all`` runs them all in order; a failed run is one line and exit code 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..reproduce import EXPERIMENTS, module_name


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="re-run a paper's headline experiment at small scale (offline)",
        description="Re-run a small, offline version of a paper's headline experiment and write a markdown "
                    "table (paper vs ours) and a PNG to OUT/NAME/.")
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one or more of: {', '.join(EXPERIMENTS)}, all")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="results folder (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=Path("runs/reproduce"),
                        help="folder for the training runs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run on a tiny random model")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.set_defaults(func=run)


def resolve(names: list[str]) -> list[str]:
    """Expand ``all`` and reject unknown names (ValueError naming them and the valid ones)."""
    unknown = [n for n in names if n not in EXPERIMENTS and n != "all"]
    if unknown:
        raise ValueError(f"reproduce: unknown experiment(s) {', '.join(unknown)} (choose from "
                         f"{', '.join(EXPERIMENTS)}, all)")
    chosen = list(EXPERIMENTS) if "all" in names else names
    return list(dict.fromkeys(chosen))


def run(args: argparse.Namespace) -> int:
    """Run each named experiment; one that fails is reported in one line and the next one still runs."""
    from ..reproduce.common import RunFailed

    failed = 0
    for name in resolve(args.names):
        module = importlib.import_module(module_name(name))
        try:
            report = module.run(args.out, args.work, quick=args.quick, progress=args.progress)
        except RunFailed as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: wrote {report}")
    return 1 if failed else 0
