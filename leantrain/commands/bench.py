"""``leantrain bench``: run the comparison benchmarks (one process each) and collect their JSON results.

Each script under ``benchmarks/`` compares a leantrain component with the peer library people use today
(PEFT, bitsandbytes, torchao, galore-torch) or runs a sweep of the main job; this command lists them
(``--list``, one line each from the script's docstring), runs the ones you name (default: the peer
comparisons), streams their output, and writes each result to ``--out/<name>.json``.

The scripts ship with the source checkout, not with the installed package (they import peer libraries and
write into docs/), so they are found next to the ``leantrain`` package folder; without a checkout the command
says so in one line. Ctrl-C stops the running script and its children quietly: one line, exit code 130.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

# Every script in benchmarks/ (tests/test_bench_cli.py checks this list against the folder).
BENCHMARKS = ("optimizers", "optimizers2", "projected", "adapters", "switching", "quantized", "dlrt", "memory", "lm",
              "distributed", "fusion", "fusion_text", "main_job_sweep", "init_compare", "bigmodel", "galore_fsdp",
              "dcp_save", "galore_backward", "estimator_matrix", "bigmodel_plot")
# Run when no name is given: the peer comparisons (the others are long sweeps or multi-process matrices).
DEFAULT = ("optimizers", "projected", "adapters", "switching", "quantized", "dlrt", "memory", "lm")
NO_CHECKOUT = ("the benchmarks ship with the source checkout, not the installed package: clone the repository "
               "and run `leantrain bench` from it (expected benchmarks/ at {folder})")


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` beside the ``leantrain`` package folder (a source checkout), or None when it is absent."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    return folder if any((folder / f"{name}.py").is_file() for name in BENCHMARKS) else None


def checkout() -> Path:
    """The benchmarks folder, or a one-line FileNotFoundError saying where the benchmarks come from."""
    folder = benchmarks_dir()
    if folder is None:
        raise FileNotFoundError(NO_CHECKOUT.format(folder=Path(__file__).resolve().parents[2] / "benchmarks"))
    return folder


def describe(script: Path) -> str:
    """The first sentence of a script's docstring, on one line (read with ast: nothing is imported)."""
    doc = ast.get_docstring(ast.parse(script.read_text(), filename=str(script))) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph)[0] or "(no description)"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the peer-comparison benchmarks and collect JSON results",
        description="Run benchmarks/<name>.py for each NAME (default: the peer comparisons), each in its own "
                    "process. The benchmarks come with the source checkout.")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (from: {', '.join(BENCHMARKS)})")
    parser.add_argument("--list", action="store_true", help="list every benchmark with a one-line description")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--args", default="", help="extra options for each script, e.g. --args 'lr --steps 60'")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"),
                        help="folder for JSON results (default: %(default)s)")
    parser.set_defaults(func=run)


def list_benchmarks(folder: Path) -> str:
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"{name:<{width}}  {describe(folder / f'{name}.py')}" for name in BENCHMARKS)


def run_script(cmd: list[str]) -> int:
    """Run one benchmark in its own session; on Ctrl-C stop it and its children quietly, then re-raise."""
    proc, interrupted = _start_uninterrupted(cmd)
    try:
        if interrupted:
            raise KeyboardInterrupt
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise


def _start_uninterrupted(cmd: list[str]) -> tuple[subprocess.Popen, bool]:
    """Start the script with Ctrl-C deferred: a KeyboardInterrupt raised inside ``Popen`` after the fork would lose
    the handle of a child that runs in its own session, so nothing would stop it. Returns (process, interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        return subprocess.Popen(cmd, start_new_session=True), False
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    return proc, bool(seen)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the script's process group (it and e.g. its training processes exit without a traceback)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(args: argparse.Namespace) -> int:
    """``--list``, or run the named benchmarks one after another (exit 1 if any failed)."""
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(BENCHMARKS)}")
    folder = checkout()
    if args.list:
        print(list_benchmarks(folder))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.names or DEFAULT:
        print(f"\n=== benchmarks/{name}.py ===", flush=True)
        cmd = [sys.executable, str(folder / f"{name}.py"), *shlex.split(args.args),
               "--json", str(args.out / f"{name}.json"), *(["--quick"] if args.quick else [])]
        if run_script(cmd) != 0:
            failed.append(name)
    print(f"\nresults in {args.out}/" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
