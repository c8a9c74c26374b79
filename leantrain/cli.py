"""``leantrain`` command line: a thin shell over functions that are all callable from Python.

Subcommands live in ``leantrain/commands/<name>.py``; each registers its own parser. Expected user errors
(bad option values, missing files, corrupt checkpoints) print one line ``leantrain: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = [
    "leantrain.commands.train",
    "leantrain.commands.export",
    "leantrain.commands.merge",
    "leantrain.commands.predict",
    "leantrain.commands.switch",
    "leantrain.commands.memory",
    "leantrain.commands.compare",
    "leantrain.commands.bench",
    "leantrain.commands.dlrt_demo",
    "leantrain.commands.checkpoint",
    "leantrain.commands.reproduce",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantrain", description="Train and fine-tune within a memory budget.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that subcommand is not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, KeyError, CheckpointError, FloatingPointError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"leantrain: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leantrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
