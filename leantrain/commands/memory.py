"""``leantrain memory``: estimate training memory (weights, gradients, optimizer states, activations).

    leantrain memory --model llama-1b --method galore --rank 512 --dtype bf16
    leantrain memory --model minilm --method lora --batch-size 16 --seq-len 64 --json
"""
from __future__ import annotations

import argparse
import json
import sys

from ..memory.estimate import DTYPE_BYTES, METHODS, OPTIMIZERS, estimate
from ..memory.modelspec import available_models


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("memory", help="estimate training memory of a model/method/optimizer",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help=f"{', '.join(available_models())} or a folder with config.json")
    p.add_argument("--method", default="full", choices=METHODS)
    p.add_argument("--optim", default="adamw", choices=sorted(OPTIMIZERS))
    p.add_argument("--rank", type=int, default=8, help="adapter / GaLore / DLRT rank")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_BYTES))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="frozen base weights (adapters only)")
    p.add_argument("--targets", default="all-linear", help="adapted Linears: all-linear, names, or re:<regex>")
    p.add_argument("--fraction", type=float, default=None, help="SHiRA: trainable share of each matrix")
    p.add_argument("--block-size", type=int, default=256, help="block size of 8/4-bit optimizer states")
    p.add_argument("--attention", choices=["eager", "flash"], default="eager")
    p.add_argument("--layerwise", action="store_true", help="per-layer optimizer step (GaLore 7B recipe)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="sizes the optimizer step workspace")
    p.add_argument("--num-labels", type=int, default=2, help="classifier head size for encoder models")
    p.add_argument("--json", action="store_true", help="print one JSON object of byte counts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = estimate(args.model, method=args.method, optim=args.optim, dtype=args.dtype,
                          batch_size=args.batch_size, seq_len=args.seq_len,
                          activation_checkpointing=args.activation_checkpointing, rank=args.rank,
                          quantize=args.quantize, targets=args.targets, fraction=args.fraction,
                          block_size=args.block_size, attention=args.attention, layerwise=args.layerwise,
                          device=args.device, num_labels=args.num_labels)
    except (ValueError, FileNotFoundError) as exc:
        print(f"leantrain: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        print(report.format_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m leantrain.commands.memory``) until the lead wires it into cli.py."""
    parser = argparse.ArgumentParser(prog="leantrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["memory", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
