"""``leantrain memory``: estimate training memory (weights, gradients, optimizer states, activations).

Same vocabulary as ``leantrain train``: --method and --optim take the registry names, and the settings both
commands share (--rank, --batch-size, --max-length, --targets, ...) are train's options with train's help.

    leantrain memory --model llama-1b --method full --optim galore-adamw --rank 512 --dtype bf16
    leantrain memory --model minilm --method lora --batch-size 16 --max-length 64 --json
"""
from __future__ import annotations

import argparse
import json
import sys

from ..memory.estimate import (
    DTYPE_BYTES,
    ESTIMATED_METHODS,
    METHOD_ALIASES,
    METHODS,
    OPTIMIZERS,
    estimate,
    resolve_method_alias,
)
from ..memory.modelspec import available_models
from .train import _extra_item, add_field_option, flag_of

# Options shared with ``leantrain train``: TrainConfig field -> this command's default (a single micro-batch
# of a long sequence, the usual "will it fit" question, not train's default job).
SHARED_DEFAULTS = {"rank": 8, "batch_size": 1, "max_length": 512, "activation_checkpointing": False,
                   "quantize": None, "targets": "all-linear", "fraction": None, "block_size": 256}
POSITIVE = ("rank", "batch_size", "max_length", "block_size")  # refused by argparse, naming the option


def positive_int(text: str) -> int:
    """argparse type: an int > 0 (the estimator's counts are meaningless otherwise)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def method_choices() -> list[str]:
    """Every ``leantrain train --method`` name plus the documented old spellings (see docs/memory.md)."""
    from ..methods import available_methods

    return [*available_methods(), *METHOD_ALIASES]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("memory", help="estimate training memory of a model/method/optimizer",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help=f"{', '.join(available_models())} or a folder with config.json")
    p.add_argument("--method", default="full", choices=method_choices(), metavar="METHOD",
                   help=f"what trains, as in leantrain train (estimated: {', '.join(ESTIMATED_METHODS)}; old "
                        "spellings galore = --optim galore-<optim>, galore-8bit = --optim galore-adamw8bit) "
                        "(default: full)")
    add_field_option(p, "optim", default="adamw", choices=sorted(OPTIMIZERS), metavar="OPTIM",
                     help_suffix=f"; one of: {', '.join(sorted(OPTIMIZERS))} (adam, lion, sgd, sgd-momentum: "
                                 "torch.optim references, estimate only)")
    for name, default in SHARED_DEFAULTS.items():
        aliases = ["--seq-len"] if name == "max_length" else []
        extra = {"type": positive_int} if name in POSITIVE else {}
        if name == "quantize":
            extra["choices"] = [None, "nf4", "int8"]
        add_field_option(p, name, *aliases, default=default, **extra,
                         help_suffix="; --seq-len is an alias" if aliases else "")
    add_field_option(p, "dtype", default="fp32", choices=sorted(DTYPE_BYTES))
    p.add_argument("--attention", choices=["eager", "flash"], default="eager")
    add_field_option(p, "layerwise", default=False)
    add_field_option(p, "grad_accum", default=1, type=positive_int)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="sizes the optimizer step workspace")
    p.add_argument("--num-labels", type=positive_int, default=2, help="classifier head size for encoder models")
    p.add_argument("--extra", metavar="KEY=VALUE", action="append", type=_extra_item, default=None,
                   help="a method option of TrainConfig.extra, as in leantrain train (e.g. --extra "
                        "sltrain_density=0.05, --extra relora_warm_start=100); repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON object of byte counts")
    p.set_defaults(func=run)


def train_vocabulary(method: str, optim: str) -> tuple[str, str]:
    """(method, optim) in ``leantrain train``'s names; an old spelling prints a one-line note on stderr, a
    registered method the estimator does not model is refused in one line."""
    if method not in METHODS:
        raise ValueError(f"{flag_of('method')} {method} trains fine but is not modelled by the memory estimator "
                         f"(estimated: {', '.join(ESTIMATED_METHODS)})")
    resolved = resolve_method_alias(method, optim)
    if resolved != (method, optim):
        print(f"leantrain memory: note: {flag_of('method')} {method} is the old spelling of "
              f"{flag_of('method')} {resolved[0]} {flag_of('optim')} {resolved[1]}", file=sys.stderr)
    return resolved


def run(args: argparse.Namespace) -> int:
    method, optim = train_vocabulary(args.method, args.optim)
    report = estimate(args.model, method=method, optim=optim, dtype=args.dtype, batch_size=args.batch_size,
                      seq_len=args.max_length, activation_checkpointing=args.activation_checkpointing,
                      rank=args.rank, quantize=args.quantize, targets=args.targets, fraction=args.fraction,
                      block_size=args.block_size, attention=args.attention, layerwise=args.layerwise,
                      grad_accum=args.grad_accum, device=args.device, num_labels=args.num_labels,
                      extra=dict(args.extra or []))
    print(json.dumps(report.as_dict(), sort_keys=True) if args.json else report.format_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m leantrain.commands.memory``), same as ``leantrain memory``."""
    from ..cli import main as cli_main

    return cli_main(["memory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
