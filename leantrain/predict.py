"""Predictions from a finished run, for every method: labels and class probabilities for new texts
(classification), or continuations of prompts (causal LM: greedy, or sampled with a temperature and a seed).

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
from typing import TYPE_CHECKING

import torch

from .config import TrainConfig
from .sources import column, read_rows, read_utf8

if TYPE_CHECKING:
    from .run import Run

TASKS = ("classify", "causal-lm")


def finished_run_config(run_dir: str | Path) -> TrainConfig:
    """The config of the finished run in ``run_dir``; one-line errors for anything else."""
    run_dir = Path(run_dir)
    for needed in ("config.json", "metrics.json", "trainable.safetensors"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(f"{str(run_dir / needed)!r} is missing (is {str(run_dir)!r} a finished run?)")
    cfg = TrainConfig.load(run_dir / "config.json")
    if cfg.task not in TASKS:
        raise ValueError(f"{str(run_dir)!r} is a --task {cfg.task} run; predict and export read {' and '.join(TASKS)}")
    return cfg


def load_trained(run_dir: str | Path) -> Run:
    """The finished run in ``run_dir`` rebuilt with its final weights, in eval mode (a ``Run``)."""
    from safetensors.torch import load_file

    from .checkpoint import load_trainable
    from .run import build_run

    cfg = finished_run_config(run_dir)
    extra = {k: v for k, v in cfg.extra.items() if k != "eval_before"}  # rebuilding needs no evaluation
    run = build_run(replace(cfg, resume=False, overwrite=False, progress=False, extra=extra))
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


@torch.no_grad()
def generate(run: Run, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 8, progress: bool = True) -> Iterator[str]:
    """The continuation of each prompt (text after the prompt, special tokens dropped), batched with left padding.

    Greedy when ``temperature`` is 0, else sampled from softmax(logits / temperature) with a generator seeded by
    ``seed`` (the same seed and batch size give the same texts). Tokens as in training: no special tokens added,
    ids mapped to the run's kept vocabulary for scratch models; a prompt longer than the context keeps its end.
    """
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    task, model = run.task, run.task.model
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, file=sys.stderr)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [_prompt_ids(task, text) for text in chunk]
        out = _generate_batch(model, ids, max_new_tokens, temperature, generator, _compact_eos(task), task.device)
        for row in out:
            yield _decode(task, row)
        bar.update(len(chunk))
    bar.close()


def _compact_eos(task) -> int:
    return task.eos_id if task.vocab is None else int(task.vocab.to_compact(torch.tensor([task.eos_id]))[0])


def _prompt_ids(task, text: str) -> list[int]:
    ids = torch.tensor(task.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if task.vocab is not None:
        ids = task.vocab.to_compact(ids)
    return ids.tolist()


def _decode(task, ids: list[int]) -> str:
    tensor = torch.tensor(ids, dtype=torch.long)
    if task.vocab is not None:
        tensor = task.vocab.to_original(tensor)
    return task.tokenizer.decode(tensor.tolist(), skip_special_tokens=True)


def _generate_batch(model, prompts: list[list[int]], new_tokens: int, temperature: float,
                    generator: torch.Generator, eos: int, device) -> list[list[int]]:
    """New token ids per prompt (up to and without the first end-of-text), with a KV cache. Left padding with the
    attention mask and position ids counted from each prompt's first token, so a padded prompt gives its unpadded
    logits."""
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if new_tokens >= limit:
        raise ValueError(f"--max-new-tokens {new_tokens} must be smaller than the model's context of {limit} tokens")
    prompts = [p[-(limit - new_tokens):] if p else [eos] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    for step in range(new_tokens):
        nxt = _next_token(out.logits[:, -1].float(), temperature, generator)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()) or step == new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    rows = torch.stack(new, 1).tolist()
    return [row[:row.index(eos)] if eos in row else row for row in rows]


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy (temperature 0) or one draw from softmax(logits / temperature) per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def format_generations(prompts: list[str], completions: list[str], fmt: str) -> str:
    """CSV (prompt, completion) or JSONL ({"prompt", "completion"})."""
    if fmt == "jsonl":
        return "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["prompt", "completion"])
    writer.writerows(zip(prompts, completions))
    return out.getvalue()
