"""``leantrain compare``: run the main job with several methods and tabulate accuracy, memory and speed."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from ..compare import DEFAULT, entries

    parser = subparsers.add_parser(
        "compare", help="run the main job once per method and write a table + plots",
        description="Run `leantrain train` once per method (each in its own process) and write results.md, "
                    "results.json and compare.png to --out. Options after `--` go to every train run (an entry's "
                    "method and optimizer win over them). Finished runs with an unchanged config are reused, so "
                    "re-running the command resumes an interrupted comparison.")
    parser.add_argument("--methods", default=",".join(DEFAULT),
                        help=f"comma-separated entries from: {', '.join(entries())} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="options passed to every train run (after --)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print its table and say where the files are (exit 1 if any run failed)."""
    from ..compare import format_compare, run_compare

    extra = [a for a in args.train_args if a != "--"]
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = run_compare(args.out, labels, extra, progress=args.progress)
    print(format_compare(rows))
    print(f"\nwrote {args.out / 'results.md'}, {args.out / 'results.json'} and {args.out / 'compare.png'}")
    return 0 if all("error" not in r for r in rows) else 1
