"""``leantrain merge RUN --out DIR``: fold a run's adapter into its base model and write a plain model.

Rebuilds the model exactly as training did (RUN/config.json, RUN/labels.json), loads the PEFT adapter
(RUN/adapter) and the trained head (RUN/head.safetensors), merges, removes the wrappers and writes
DIR/model.safetensors (the original architecture's state_dict keys) + DIR/config.json + DIR/labels.json.
A run trained on a quantized base is merged into the dequantized base, i.e. the weights it was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..atomic import atomic_write


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge a run's adapter into the base model and save a plain model",
        description="Merge RUN/adapter (+ RUN/head.safetensors) into the base model and write "
        "DIR/model.safetensors.",
    )
    parser.add_argument(
        "run", help="run folder written by `leantrain train` (holds config.json and adapter/)"
    )
    parser.add_argument(
        "--out", required=True, help="folder for model.safetensors, config.json and labels.json"
    )
    parser.set_defaults(func=run)


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Python entry point of the command; returns the path of the written model.safetensors."""
    from safetensors.torch import load_file, save_file

    from .. import adapters
    from ..config import TrainConfig
    from ..models import build_classifier

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for needed in ("config.json", "labels.json", "adapter/adapter_config.json", "head.safetensors"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(
                f"{str(run_dir / needed)!r} is missing (is {str(run_dir)!r} an adapter run?)"
            )
    cfg = TrainConfig.load(run_dir / "config.json")
    labels = json.loads((run_dir / "labels.json").read_text())
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"{run_dir / 'labels.json'} must hold a non-empty JSON list of label names")
    model = build_classifier(cfg.model, len(labels), cfg.seed)
    if cfg.quantize:
        from ..quant import quantize

        quantize(model, bits=cfg.quantize, targets=cfg.targets)
    adapters.load(model, run_dir / "adapter")
    head = load_file(str(run_dir / "head.safetensors"))
    own = model.classifier.state_dict()
    for key, value in head.items():
        if key not in own or tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"head.safetensors key {key!r} {tuple(value.shape)} does not fit the head "
                f"{ {k: tuple(v.shape) for k, v in own.items()} }"
            )
    model.classifier.load_state_dict(head, strict=True)
    if cfg.quantize:
        from ..quant import dequantize_model

        dequantize_model(model)
    adapters.merge(model)
    adapters.unload(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.safetensors"
    atomic_write(target, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json() + "\n"))
    atomic_write(out_dir / "labels.json", lambda tmp: Path(tmp).write_text(json.dumps(labels) + "\n"))
    return target


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    target = merge_run(args.run, args.out)
    print(f"merged model written to {target}")
    return 0
