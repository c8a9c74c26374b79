"""``leantrain merge RUN --out DIR``: the old name of ``leantrain export`` (same options, same default ``--format
hf``): the run's adapter merged into its base, written as a folder transformers loads."""
from __future__ import annotations

import argparse
from pathlib import Path

from .export import add_arguments, print_caveats


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="alias of `leantrain export` (merged model, --format hf)",
                                   description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)


def merge_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "hf", overwrite: bool = False) -> Path:
    """Python entry point of the command; returns the export folder."""
    from ..export import export_run

    return export_run(run_dir, out_dir, fmt, overwrite)


def run(args: argparse.Namespace) -> int:
    out = merge_run(args.run, args.out, args.format, args.overwrite)
    print(f"merged model written to {out} ({args.format}; see {out}/README.md)")
    print_caveats(args.format, out)
    return 0
