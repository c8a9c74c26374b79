"""``leantrain predict RUN --data FILE|-``: labels and class probabilities of a finished classification run, or
continuations of prompts by a finished causal-LM run.

    leantrain predict runs/main --data reviews.csv --out predictions.csv
    echo "what a wonderful film" | leantrain predict runs/main --data -
    leantrain predict runs/lm --data prompts.txt --max-new-tokens 40 --out completions.jsonl
    leantrain predict runs/lm --data prompts.txt --temperature 0.8 --seed 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import write_text_atomic

CLASSIFY_BATCH, GENERATE_BATCH = 64, 8


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="label new texts (classification) or continue prompts (causal LM) "
                              "with a finished run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by `leantrain train` (holds config.json and trainable.safetensors)")
    p.add_argument("--data", required=True,
                   help="a .csv/.jsonl file (its --text-column), a .txt file or - for stdin (one text per line); "
                        "for a causal-LM run each text is a prompt")
    p.add_argument("--text-column", default=None,
                   help="column of --data that holds the texts (default: the run's --text-column, usually text)")
    p.add_argument("--out", type=Path, default=None,
                   help="write predictions here (.jsonl for JSON lines, else CSV); default: CSV on stdout")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"texts per forward pass (default: {CLASSIFY_BATCH}; {GENERATE_BATCH} prompts for a causal LM)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="causal LM: tokens generated per prompt at most (stops earlier at end-of-text; default: 32)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="causal LM: 0 = greedy (default); > 0 samples from softmax(logits / T), seeded by --seed")
    p.add_argument("--seed", type=int, default=0, help="causal LM: seed of the sampling with --temperature > 0")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace, task: str) -> None:
    """Options that do not apply to the run's task are refused rather than ignored."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if task == "causal-lm":
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
        if args.temperature < 0:
            raise ValueError(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
        return
    given = [flag for flag, value, default in (("--max-new-tokens", args.max_new_tokens, 32),
                                               ("--temperature", args.temperature, 0.0), ("--seed", args.seed, 0))
             if value != default]
    if given:
        raise ValueError(f"{', '.join(given)} apply to causal-LM runs; {args.run!r} is a classification run")


def run(args: argparse.Namespace) -> int:
    from ..predict import (
        finished_run_config,
        format_generations,
        format_rows,
        generate,
        load_trained,
        predict,
        read_texts,
    )

    cfg = finished_run_config(args.run)  # a wrong RUN fails before stdin is read
    _check(args, cfg.task)
    texts = read_texts(args.data, args.text_column or cfg.text_column)
    if not texts:
        raise ValueError(f"--data {args.data!r} holds no text to {'continue' if cfg.task == 'causal-lm' else 'classify'}")
    trained = load_trained(args.run)
    fmt = "jsonl" if args.out is not None and args.out.suffix.lower() == ".jsonl" else "csv"
    if cfg.task == "causal-lm":
        completions = list(generate(trained, texts, args.max_new_tokens, args.temperature, args.seed,
                                    args.batch_size or GENERATE_BATCH, args.progress))
        body = format_generations(texts, completions, fmt)
    else:
        results = list(predict(trained, texts, args.batch_size or CLASSIFY_BATCH, args.progress))
        body = format_rows(texts, results, trained.task.data.label_names, fmt)
    if args.out is None:
        sys.stdout.write(body)
    else:
        write_text_atomic(args.out, body)
        print(f"{len(texts)} predictions -> {args.out}", file=sys.stderr)
    return 0
