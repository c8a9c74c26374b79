"""``leantrain bench``: run the comparison benchmarks (one process each) and collect their JSON results.

Each script under ``benchmarks/`` compares a leantrain component with the peer library people use today
(PEFT, bitsandbytes, torchao, galore-torch) in the same process and prints ratios; this command runs the ones
you name (default: all), streams their tables, and writes every result to ``--out/<name>.json``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["optimizers", "projected", "adapters", "switching", "quantized", "dlrt", "memory", "lm"]


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the peer-comparison benchmarks and collect JSON results",
        description="Run benchmarks/<name>.py for each NAME (default: all that exist), each in its own process.")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (from: {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON results (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark scripts not found at {folder} (run from a source checkout)")
    names = args.names or [n for n in BENCHMARKS if (folder / f"{n}.py").is_file()]
    missing = [n for n in names if not (folder / f"{n}.py").is_file()]
    if missing:
        raise ValueError(f"unknown benchmark {missing[0]!r}; available: "
                         f"{', '.join(sorted(p.stem for p in folder.glob('*.py')))}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        print(f"\n=== benchmarks/{name}.py ===", flush=True)
        cmd = [sys.executable, str(folder / f"{name}.py"), "--json", str(args.out / f"{name}.json")]
        if args.quick:
            cmd.append("--quick")
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    print(f"\nresults in {args.out}/" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
