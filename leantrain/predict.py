"""Predictions from a finished run: labels and class probabilities for new texts, for every method.

The trained model is rebuilt exactly as training built it -- ``run.build_run`` on the run's own config.json (same
task, quantized base, method, seeds) -- and the final ``trainable.safetensors`` is loaded through the method's
``load_trainable_state`` hook (or the default loader), as ``--resume`` does. So one code path serves LoRA, DoRA,
SHiRA, DLRT, GradNormLoRP, quantized bases and full fine-tuning alike. Rebuilding the task reads the run's
training data (its tokenizer and label set come from there); a run whose data file has moved cannot be rebuilt.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainConfig
from .sources import column, read_rows, read_utf8


def finished_run_config(run_dir: str | Path) -> TrainConfig:
    """The config of the finished classification run in ``run_dir``; one-line errors for anything else."""
    run_dir = Path(run_dir)
    for needed in ("config.json", "metrics.json", "trainable.safetensors"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(f"{str(run_dir / needed)!r} is missing (is {str(run_dir)!r} a finished run?)")
    cfg = TrainConfig.load(run_dir / "config.json")
    if cfg.task != "classify":
        raise ValueError(f"leantrain predict: {str(run_dir)!r} is a --task {cfg.task} run; predict supports "
                         "classification runs (causal-LM generation is not built yet)")
    return cfg


def load_trained(run_dir: str | Path):
    """The finished classification run in ``run_dir`` rebuilt with its final weights, in eval mode (a ``Run``)."""
    from safetensors.torch import load_file

    from .checkpoint import load_trainable
    from .run import build_run

    cfg = finished_run_config(run_dir)
    run = build_run(replace(cfg, resume=False, overwrite=False, progress=False))
    state = load_file(str(Path(run_dir) / "trainable.safetensors"))
    hook = getattr(run.method, "load_trainable_state", None)
    if hook is not None:
        hook(run.task.model, state)
    else:
        load_trainable(run.task.model, state)
    run.task.model.eval()
    return run


def read_texts(source: str, text_column: str = "text") -> list[str]:
    """Texts to classify: ``-`` reads stdin (one text per non-empty line), a .txt file likewise, a .csv or
    .jsonl file its ``text_column``."""
    if source == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"data file {source!r} does not exist")
        return [line for line in read_utf8(path).splitlines() if line.strip()]
    return column(read_rows(path), text_column, path)


@torch.no_grad()
def predict(run, texts: list[str], batch_size: int = 64, progress: bool = True) -> Iterator[tuple[str, list[float]]]:
    """(label, probabilities in label order) for each text, batched; truncation as in training."""
    from tqdm import tqdm

    task = run.task
    names = task.data.label_names
    bar = tqdm(total=len(texts), desc="predict", unit="text", disable=not progress, file=sys.stderr)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = task.tokenizer(chunk, truncation=True, max_length=run.cfg.max_length, padding=True,
                             return_tensors="pt")
        logits = task.model(enc["input_ids"].to(task.device), enc["attention_mask"].to(task.device)).float()
        for probs in torch.softmax(logits, -1).cpu().tolist():
            yield names[max(range(len(probs)), key=probs.__getitem__)], probs
        bar.update(len(chunk))
    bar.close()


def format_rows(texts: list[str], results: list[tuple[str, list[float]]], names: list[str], fmt: str) -> str:
    """CSV (text, label, p_<label>...) or JSONL ({"text", "label", "probabilities": {label: p}})."""
    if fmt == "jsonl":
        return "".join(json.dumps({"text": t, "label": label, "probabilities": dict(zip(names, probs))}) + "\n"
                       for t, (label, probs) in zip(texts, results))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "label", *(f"p_{n}" for n in names)])
    for t, (label, probs) in zip(texts, results):
        writer.writerow([t, label, *(f"{p:.6f}" for p in probs)])
    return out.getvalue()
