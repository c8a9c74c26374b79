"""``leantrain export``: a finished run as files other tools load, for every method and task.

The run is rebuilt exactly as ``leantrain predict`` rebuilds it (``predict.load_trained``: its own config, the
final ``trainable.safetensors``), then turned into a plain model in place (:func:`densify`): a quantized base is
dequantized, adapters are merged and unwrapped, factorised layers (DLRT's U S Vᵀ, the low-rank baseline's B A,
SLTrain's s B A + S, GradNormLoRP's g V/|V|) are multiplied back into dense ``nn.Linear`` weights.

Formats (``docs/export.md`` has the loading code for each):
  * ``hf``: a transformers folder. Causal LMs: ``AutoModelForCausalLM`` (+ tokenizer). Classifiers:
    ``AutoModelForSequenceClassification`` (+ tokenizer, label names), with one appended BERT layer that computes
    leantrain's mean pooling (``export_bert.py``).
  * ``peft``: the run's adapter in PEFT's layout (``PeftModel.from_pretrained``) and, in ``base/``, the ``hf``
    export of the base it was trained on (dequantized, PiSSA's residual, the trained head), so the pair reproduces
    the run. Methods whose adapter PEFT has: LoRA (+ rsLoRA, DoRA, PiSSA, LoRA-FA, ReLoRA), VeRA, MiSS, SHiRA.
  * ``safetensors``: the merged state dict under leantrain's own module names, with the run's labels.json / lm.json.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .atomic import follow_umask, temp_dir, write_safetensors_atomic, write_text_atomic

if TYPE_CHECKING:
    from .run import Run

FORMATS = ("hf", "peft", "safetensors")
PEFT_TYPES = ("LORA", "VERA", "MISS", "SHIRA")  # adapter types PEFT 0.21.2 loads (peft.PeftType)
PLAIN_PACKAGES = ("torch.", "transformers.")


def densify(model: nn.Module) -> list[str]:
    """Make ``model`` a plain torch/transformers model with the same function; returns what was done."""
    from . import adapters
    from .quant import dequantize_model

    notes = []
    dequantized = dequantize_model(model)
    if dequantized:
        notes.append(f"quantized base dequantized to dense weights ({len(dequantized)} layers)")
    if list(adapters.adapter_layers(model)):
        merged = adapters.merge(model)
        notes.append(f"adapter(s) {', '.join(merged)} merged into the base weights")
        adapters.unload(model)
    factored = replace_factored_layers(model)
    if factored:
        notes.append(f"factorised layers multiplied back to dense weights ({len(factored)} layers)")
    refuse_leftovers(model)
    return notes


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The dense weight a factorised / re-parametrised Linear applies, or None for any other module."""
    kind = type(module).__name__
    if kind == "LowRankLinear":
        return module.weight_matrix()
    if kind == "FactorizedLinear":
        return module.B.detach() @ module.A.detach()
    if kind == "SparseLowRankLinear":
        return module.weight_dense().detach()
    if kind == "WeightNormLinear":
        return module.weight().detach()
    return None


@torch.no_grad()
def replace_factored_layers(model: nn.Module) -> list[str]:
    from .targets import set_submodule

    names = []
    for name, module in list(model.named_modules()):
        weight = dense_weight(module)
        if weight is None:
            continue
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach())
        set_submodule(model, name, linear)
        names.append(name)
    return names


def refuse_leftovers(model: nn.Module) -> None:
    """Every module must now be torch's or transformers' (leantrain's own SequenceClassifier shell aside)."""
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith(PLAIN_PACKAGES) or cls.__name__ == "SequenceClassifier":
            continue
        raise ValueError(f"export: module {name!r} is a {cls.__name__}, which has no dense form yet; "
                         "this run cannot be exported as a plain model")


# --- the formats -----------------------------------------------------------------------------------------------
def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "hf", overwrite: bool = False) -> Path:
    """Export the finished run ``run_dir`` to ``out_dir`` in ``fmt``; the folder appears complete or not at all."""
    from .predict import finished_run_config, load_trained

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = finished_run_config(run_dir)
    if fmt == "peft":
        refuse_peft(cfg.method)
    inside = out_dir.resolve() == run_dir.resolve() or out_dir.resolve() in run_dir.resolve().parents
    if inside:
        raise ValueError(f"--out {str(out_dir)!r} would replace the run folder {str(run_dir)!r}; choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {str(out_dir)!r} exists and is not empty; pass --overwrite to replace it")
    run = load_trained(run_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        writer = {"hf": write_hf, "peft": write_peft, "safetensors": write_safetensors}[fmt]
        notes = writer(run, run_dir, tmp, out_dir)
        meta = {"format": fmt, "run": str(run_dir.resolve()), "task": cfg.task, "method": cfg.method,
                "quantize": cfg.quantize, "dtype": str(next(run.task.model.parameters()).dtype).removeprefix("torch."),
                "notes": notes}
        write_text_atomic(tmp / "export.json", json.dumps(meta, indent=2) + "\n")
        from .export_docs import readme

        write_text_atomic(tmp / "README.md", readme(fmt, cfg.task, out_dir, notes))
        follow_umask(tmp)  # transformers writes some files 0600
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


PEFT_METHODS = ("lora", "rslora", "dora", "pissa", "lora-fa", "relora", "vera", "miss", "shira")


def refuse_peft(method: str) -> None:
    """One line naming the method and the formats that work, for a method PEFT has no adapter type for."""
    if method not in PEFT_METHODS:
        raise ValueError(f"--format peft: method {method!r} has no PEFT adapter (PEFT formats exist for "
                         f"{', '.join(PEFT_METHODS)}); use --format hf or --format safetensors")


def write_safetensors(run: Run, run_dir: Path, tmp: Path, out_dir: Path) -> list[str]:
    """model.safetensors: the plain model's state dict under leantrain's module names."""
    model = run.task.model
    notes = densify(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "task": run.cfg.task}
    if run.cfg.task == "classify":
        meta["pooling"] = "mean"
        notes.append("classifier: encoder -> masked mean pooling -> classifier (Linear); keys encoder.*, classifier.*")
    write_safetensors_atomic(tmp / "model.safetensors", state, metadata=meta)
    for name in ("labels.json", "lm.json", "config.json"):
        if (run_dir / name).is_file():
            target = "leantrain_config.json" if name == "config.json" else name
            write_text_atomic(tmp / target, (run_dir / name).read_text())
    if run.cfg.task == "causal-lm" and run.task.vocab is not None:
        notes.append(f"scratch model: ids are positions in lm.json's vocab_original_ids ({len(run.task.vocab)} "
                     "tokens of the tokenizer's vocabulary)")
    return notes


def write_hf(run: Run, run_dir: Path, tmp: Path, out_dir: Path) -> list[str]:
    """A transformers folder: model (config.json + model.safetensors) and tokenizer."""
    from .export_hf import save_causal_lm, save_classifier

    notes = densify(run.task.model)
    save = save_classifier if run.cfg.task == "classify" else save_causal_lm
    return notes + save(run, run_dir, tmp)


def write_peft(run: Run, run_dir: Path, tmp: Path, out_dir: Path) -> list[str]:
    """The adapter in PEFT's layout at the root, the base it applies to (an ``hf`` export) in ``base/``."""
    from .export_hf import save_causal_lm, save_classifier, save_peft_adapter

    notes = save_peft_adapter(run, tmp, out_dir / "base")
    base = run.task.model
    notes += densify_base(base)
    save = save_classifier if run.cfg.task == "classify" else save_causal_lm
    (tmp / "base").mkdir()
    notes += [f"base/: {n}" for n in save(run, run_dir, tmp / "base")]
    return notes


def densify_base(model: nn.Module) -> list[str]:
    """The base the adapter was trained on: quantized layers dequantized, adapters dropped (not merged)."""
    from . import adapters
    from .quant import dequantize_model

    notes = []
    if dequantize_model(model):
        notes.append("base/: the quantized base dequantized to dense weights (the weights the adapter was "
                     "trained on)")
    adapters.unload(model)
    return notes + densify(model)
