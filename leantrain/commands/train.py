"""``leantrain train``: every TrainConfig field is one option (generated, so help and config never drift)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from ..config import PRETRAINED_METHOD, SCRATCH_LR, SCRATCH_METHOD, TrainConfig

ALIASES = {"out": ["-o"]}


def field_help(name: str) -> str:
    """The help text of a TrainConfig field, kept in its ``metadata`` (config.py is the one place to edit it)."""
    return TRAIN_FIELDS[name].metadata.get("help", "")


def flag_of(name: str) -> str:
    """The option spelling of a TrainConfig field (``max_length`` -> ``--max-length``), shared by every command."""
    return "--" + name.replace("_", "-")


def _parse_optional(kind, words: bool = False):
    """``none``/``null`` -> None, else ``kind``; with ``words`` (an ``int | str | None`` field such as
    --train-size auto) text that is not a ``kind`` is passed on for TrainConfig to check."""
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError:
            if words:
                return text
            raise

    parse.__name__ = kind.__name__
    return parse


def add_field_option(parser: argparse.ArgumentParser, name: str, *aliases: str, default: Any = argparse.SUPPRESS,
                     help_suffix: str = "", **overrides: Any) -> None:
    """Add the option of TrainConfig field ``name`` with its type and help, so ``leantrain train`` and other
    commands that take the same setting (``leantrain memory``) spell, parse and explain it the same way.

    ``default`` is shown in the help (the field's own default when left SUPPRESSed: a flag not given is absent
    from the namespace, so a ``--config`` file's value is not overwritten)."""
    kind = _hints()[name]
    shown = TRAIN_FIELDS[name].default if default is argparse.SUPPRESS else default
    text = f"{field_help(name)}{help_suffix} (default: {shown})".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": name, "default": default, "help": text}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        stem = name.rstrip("s").upper()  # betas -> BETA1 BETA2
        kwargs.update(type=float, nargs=2, metavar=(f"{stem}1", f"{stem}2"))
    else:
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        kwargs["type"] = _parse_optional(base, str in args) if type(None) in args else base
    kwargs.update(overrides)
    parser.add_argument(flag_of(name), *ALIASES.get(name, []), *aliases, **kwargs)


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def optimizer_list() -> str:
    """Every --optim name with its default-lr scale where it is not AdamW's (``OptimizerSpec.lr_scale``)."""
    from ..optim.registry import specs
    from ..optim.spec import TASKS

    out = []
    for name, spec in specs().items():
        scales = {task: spec.lr_scale_for(task) for task in TASKS}
        if set(scales.values()) == {1.0}:
            out.append(name)
        elif len(set(scales.values())) == 1:
            out.append(f"{name} (lr x{scales[TASKS[0]]:.3g})")
        else:
            out.append(f"{name} (lr " + ", ".join(f"x{v:.3g} {t}" for t, v in scales.items()) + ")")
    return ", ".join(out)


def register(subparsers) -> None:
    from ..methods import available_methods, get_method

    parser = subparsers.add_parser(
        "train", help="fine-tune a model (default: LoRA on the embedded MiniLM, sentiment data)",
        description="Fine-tune a model, or pre-train one with --task causal-lm --init-weights scratch (then "
                    f"the defaults are --method {SCRATCH_METHOD} --lr {SCRATCH_LR:g}). Every option maps to a "
                    "TrainConfig field saved in RUN/config.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path,
                        help="read options from a .json, .toml or .yaml file of TrainConfig fields (flags given "
                             "here win)")
    parser.add_argument("--extra", metavar="KEY=VALUE", action="append", type=_extra_item, default=None,
                        help="an entry of TrainConfig.extra, e.g. --extra dlrt_freeze_other=true (VALUE is read as "
                             "JSON when it parses, else as text); repeatable")
    examples = ", ".join(f"{m} {get_method(m).default_lr:g}" for m in (PRETRAINED_METHOD, SCRATCH_METHOD))
    suffixes = {"method": f"; one of: {', '.join(available_methods())}",
                "optim": f"; one of: {optimizer_list()}",
                "lr": f" (e.g. {examples})"}
    for name in TRAIN_FIELDS:
        if name != "extra":
            add_field_option(parser, name, help_suffix=suffixes.get(name, ""))
    parser.set_defaults(func=run)


def _extra_item(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, JSON value, or the text itself when it is not JSON)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def read_config_file(path: Path) -> dict[str, Any]:
    """TrainConfig fields from a .json, .toml or .yaml/.yml file (a mapping at the top level)."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--config {str(path)!r}: reading {suffix} files needs {exc.name} "
                         f"(pip install pyyaml)") from None
    except Exception as exc:  # noqa: BLE001 - each parser has its own error class; the message names the file
        raise ValueError(f"--config {str(path)!r}: not valid {suffix.lstrip('.') or 'JSON'} "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise TypeError(f"--config {str(path)!r} must hold a mapping of TrainConfig fields")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and k != "extra"})
    if getattr(args, "extra", None):
        values["extra"] = {**values.get("extra", {}), **dict(args.extra)}
    return TrainConfig.from_dict(values)


def unused_options(cfg: TrainConfig, given: set[str]) -> list[str]:
    """Options given on the command line that only some methods/optimizers read, and neither the chosen method,
    the chosen optimizer nor --quantize (which reads --targets) does. Each spec declares its ``options``."""
    from ..methods import get_method
    from ..methods import specs as method_specs
    from ..optim.registry import get_spec
    from ..optim.registry import specs as optimizer_specs

    specific = {o for m in method_specs().values() for o in getattr(m, "options", ())}
    specific |= {o for spec in optimizer_specs().values() for o in spec.options}
    read = set(getattr(get_method(cfg.method), "options", ())) | set(get_spec(cfg.optim).options)
    if cfg.quantize:
        read.add("targets")
    return sorted((given & specific) - read)


SCRATCH_ONLY = ("arch", "preset")  # read only when --init-weights scratch builds a model


def warn_unused(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """One stderr line per given option the run will not read (it would otherwise be ignored silently)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = set(vars(args)) & names
    for name in unused_options(cfg, given):
        print(f"leantrain: warning: --{name.replace('_', '-')} is not used by --method {cfg.method} "
              f"--optim {cfg.optim}; ignored", file=sys.stderr)
    if cfg.init_weights != "scratch":
        for name in sorted(given & set(SCRATCH_ONLY)):
            print(f"leantrain: warning: --{name} is used only with --init-weights scratch (this run loads --model "
                  f"{cfg.model}); ignored", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..train import train

    cfg = config_from_args(args)
    warn_unused(cfg, args)
    train(cfg)  # prints the data line and, on rank 0, the end-of-run summary (summary.end_of_run)
    return 0
