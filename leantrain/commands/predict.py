"""``leantrain predict RUN --data FILE|-``: labels and class probabilities of a finished classification run.

    leantrain predict runs/main --data reviews.csv --out predictions.csv
    echo "what a wonderful film" | leantrain predict runs/main --data -
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import write_text_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="label new texts with a finished classification run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by `leantrain train` (holds config.json and trainable.safetensors)")
    p.add_argument("--data", required=True,
                   help="a .csv/.jsonl file (its --text-column), a .txt file or - for stdin (one text per line)")
    p.add_argument("--text-column", default="text", help="column of --data that holds the texts (default: text)")
    p.add_argument("--out", type=Path, default=None,
                   help="write predictions here (.jsonl for JSON lines, else CSV); default: CSV on stdout")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..predict import finished_run_config, format_rows, load_trained, predict, read_texts

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    finished_run_config(args.run)  # a wrong RUN fails before stdin is read
    texts = read_texts(args.data, args.text_column)
    if not texts:
        raise ValueError(f"--data {args.data!r} holds no text to classify")
    trained = load_trained(args.run)
    results = list(predict(trained, texts, args.batch_size, args.progress))
    fmt = "jsonl" if args.out is not None and args.out.suffix.lower() == ".jsonl" else "csv"
    body = format_rows(texts, results, trained.task.data.label_names, fmt)
    if args.out is None:
        sys.stdout.write(body)
    else:
        write_text_atomic(args.out, body)
        print(f"{len(texts)} predictions -> {args.out}", file=sys.stderr)
    return 0
