"""``leantrain train``: every TrainConfig field is one option (generated, so help and config never drift)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path

from ..config import TrainConfig

ALIASES = {"out": ["-o"]}


def _field_help() -> dict[str, str]:
    """Harvest the inline ``# comment`` of each field in config.py as its help text."""
    source = Path(__file__).resolve().parent.parent.joinpath("config.py").read_text()
    found = {}
    for match in re.finditer(r"^    (\w+): [^=\n]+= [^#\n]*#\s*(.+)$", source, flags=re.M):
        found[match.group(1)] = match.group(2).strip()
    return found


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def register(subparsers) -> None:
    from ..methods import available_methods
    from ..optim.registry import available_optimizers

    parser = subparsers.add_parser(
        "train", help="fine-tune a model (default: LoRA on the embedded MiniLM, sentiment data)",
        description="Fine-tune a model. Every option maps to a TrainConfig field saved in RUN/config.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="read options from a config.json (flags given here win)")
    helps = _field_help()
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "extra":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = helps.get(field.name, "")
        if field.name == "method":
            help_text += f" ({', '.join(available_methods())})"
        if field.name == "optim":
            help_text += f" ({', '.join(available_optimizers())})"
        default = getattr(defaults, field.name)
        if kind is bool:
            parser.add_argument(flag, *ALIASES.get(field.name, []), dest=field.name,
                                action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {default})")
            continue
        if field.name == "betas":
            parser.add_argument(flag, dest="betas", type=float, nargs=2, metavar=("BETA1", "BETA2"),
                                default=argparse.SUPPRESS, help=f"Adam betas (default: {default})")
            continue
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        parser.add_argument(flag, *ALIASES.get(field.name, []), dest=field.name,
                            type=_parse_optional(base) if type(None) in args else base,
                            default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {}
    if getattr(args, "config", None):
        if not args.config.is_file():
            raise FileNotFoundError(f"--config {str(args.config)!r} does not exist")
        values.update(json.loads(args.config.read_text()))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from ..train import train

    cfg = config_from_args(args)
    metrics = train(cfg)
    if metrics.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if metrics.get("stopped_early"):
        print(f"stopped at step {metrics['step']} (--stop-at); continue with: leantrain train --out {cfg.out} --resume")
        return 0
    print(format_summary(metrics, cfg))
    return 0


def format_summary(m: dict, cfg: TrainConfig) -> str:
    """Human summary of metrics.json; lines whose metrics a task does not report are left out."""
    mib = 1024 * 1024
    lines = [f"run folder          {cfg.out}"]
    if "val_accuracy" in m:
        baselines = [f"majority baseline {m['majority_baseline_accuracy']:.4f}"]
        if m.get("tfidf_baseline_accuracy") is not None:
            baselines.append(f"TF-IDF+LR baseline {m['tfidf_baseline_accuracy']:.4f}")
        lines.append(f"validation accuracy {m['val_accuracy']:.4f}   ({', '.join(baselines)})")
    if "val_perplexity" in m:
        before = m.get("val_perplexity_before")
        lines.append(f"validation perplexity {m['val_perplexity']:.3f}"
                     + (f"   (before training {before:.3f})" if before is not None else ""))
    train_loss = m.get("train_loss_last")
    lines.append(f"validation loss     {m['val_loss']:.4f}" +
                 (f"   train loss (last 20 steps) {train_loss:.4f}" if train_loss is not None else ""))
    lines.append(f"steps               {m['steps']} in {m['wall_time_s']:.1f} s ({m['sec_per_step']:.3f} s/step)")
    lines.append(f"trainable params    {m['trainable_params']:,} of {m['total_params']:,}")
    lines.append(f"memory (MiB)        params {m['param_bytes'] / mib:.1f}  grads {m['grad_bytes'] / mib:.1f}  "
                 f"optimizer state {m['optimizer_state_bytes'] / mib:.2f}  peak RSS {m['peak_rss_bytes'] / mib:.0f}")
    return "\n".join(lines)
