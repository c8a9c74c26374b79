"""``leantrain export RUN --out DIR [--format hf|peft|safetensors]``: a finished run as files other tools load.

    leantrain export runs/main --out exported                      # AutoModelForSequenceClassification / CausalLM
    leantrain export runs/main --out adapter --format peft         # PeftModel.from_pretrained(base, adapter)
    leantrain export runs/main --out merged --format safetensors   # merged state dict, leantrain's key names

A classifier's hf export is BertForSequenceClassification plus one appended encoder layer that computes
leantrain's masked mean pooling (BERT's own classifier reads the first token): its constants reach ~1e12, so the
folder is for float32 inference; use --format safetensors to train further. See docs/export.md for what loads
where.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMAT_HELP = ("hf (default): a transformers folder (model, tokenizer, label names; a classifier gets one added "
               "layer computing the mean pooling: float32 inference only); peft: the adapter in PEFT's layout + "
               "base/ (adapter methods only); safetensors: the merged state dict")


def add_arguments(parser: argparse.ArgumentParser, default: str = "hf") -> None:
    parser.add_argument("run", help="run folder written by `leantrain train` (holds config.json and "
                        "trainable.safetensors)")
    parser.add_argument("--out", required=True, help="folder to write (must be empty or new, or use --overwrite)")
    parser.add_argument("--format", default=default, choices=("hf", "peft", "safetensors"), help=FORMAT_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a finished run as a transformers / PEFT / safetensors "
                                   "folder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_run

    out = export_run(args.run, args.out, args.format, args.overwrite)
    print(f"{args.format} export written to {out} (see {out}/README.md)")
    print_caveats(args.format, out)
    return 0


def print_caveats(fmt: str, out: Path) -> None:
    """The one line a user of a classifier's hf export must read (the appended mean-pooling layer)."""
    from ..export_bert import POOLING_NOTE

    if fmt == "hf" and json.loads((out / "export.json").read_text())["task"] == "classify":
        print(POOLING_NOTE)
