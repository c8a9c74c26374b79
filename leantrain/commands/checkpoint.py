"""``leantrain checkpoint convert RUN --to single``: a sharded (FSDP2, DCP) checkpoint of RUN rewritten as a
one-process checkpoint (safetensors + JSON), for tools that read one file per checkpoint. Runs in one process
and needs no model: the saved logical layout (docs/distributed.md) says where every shard goes. The converted
checkpoint replaces the DCP one of the same step atomically; ``leantrain train --resume`` reads either."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect or convert a run's checkpoints",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    convert = sub.add_parser("convert", help="rewrite a sharded (FSDP2) checkpoint for one process")
    convert.add_argument("run", help="run folder (RUN/checkpoints/...)")
    convert.add_argument("--to", choices=["single"], required=True, help="target format: single (one process)")
    convert.add_argument("--step", type=int, default=None, help="which checkpoint (default: the latest)")
    convert.set_defaults(func=run)


def convert_run(run_dir: str | Path, step: int | None = None) -> Path:
    """Convert one checkpoint of ``run_dir`` to the one-process format; returns its folder."""
    from .. import checkpoint as ckpt
    from ..dcp_checkpoint import to_single

    run_dir = Path(run_dir)
    path = ckpt.latest_checkpoint(run_dir) if step is None else run_dir / "checkpoints" / f"step-{step:07d}"
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoint{'' if step is None else f' for step {step}'}")
    manifest = ckpt.verify_checkpoint(path)
    if manifest.get("format") != "dcp":
        raise ValueError(f"{path} is already a one-process checkpoint")
    model, optimizer = to_single(path)
    trainer, rng = ckpt.load_trainer_files(path, manifest)
    trainer.update(optimizer_format="index", converted_from="dcp")
    step_n = trainer.pop("step")
    latest = ckpt.latest_checkpoint(run_dir)
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)  # the DCP checkpoint stays on disk until the new one is complete
    try:
        out = ckpt.save_checkpoint(run_dir, step_n, model, optimizer, trainer, rng)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if latest is not None and latest.name != out.name:  # converting an older step keeps the newest as latest
        ckpt.write_text_atomic(run_dir / "checkpoints" / "latest", latest.name + "\n")
    return out


def run(args: argparse.Namespace) -> int:
    out = convert_run(args.run, args.step)
    print(f"converted to a one-process checkpoint: {out}")
    return 0
