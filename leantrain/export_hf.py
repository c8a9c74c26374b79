"""Writers of ``leantrain export``'s transformers and PEFT folders (the plain model comes from ``export.densify``).

Causal LMs save as they are (they are transformers models), except a scratch model whose vocabulary was cut to
the tokens its corpus uses (``lm.data.VocabMap``): it is widened back to the tokenizer's vocabulary so the
tokenizer works unchanged. Input rows of the dropped tokens copy [UNK]'s row (leantrain maps them to [UNK]), the
kept tokens' logits are the trained ones, the dropped tokens' output rows are zero and ``generation_config.json``
suppresses them, since the trained model cannot emit them.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .atomic import write_safetensors_atomic, write_text_atomic
from .models import quiet_hf_loading

if TYPE_CHECKING:
    from .lm.data import VocabMap
    from .run import Run

CLASSIFY_RENAME = ("encoder.", "bert.")  # leantrain SequenceClassifier path -> BertForSequenceClassification path


def save_classifier(run: Run, run_dir: Path, out: Path) -> list[str]:
    """BertForSequenceClassification (mean pooling as an appended layer) + tokenizer + label names."""
    from .export_bert import to_bert_for_sequence_classification

    labels = json.loads((run_dir / "labels.json").read_text())
    model = run.task.model.float().eval()
    hf = to_bert_for_sequence_classification(model, labels)
    with quiet_hf_loading():
        hf.save_pretrained(str(out))
    save_tokenizer(run.task.tokenizer, out, run.cfg.max_length)
    layers = hf.config.num_hidden_layers
    return [(f"BertForSequenceClassification: the last encoder layer (index {layers - 1}) is added and computes "
            "leantrain's masked mean pooling; pooler + classifier reproduce the trained head (float32 inference; "
            "logits equal leantrain's to ~1e-6)"),
            f"tokenizer truncates at {run.cfg.max_length} tokens (the run's --max-length)",
            f"labels: {', '.join(labels)}"]


def save_tokenizer(tokenizer: Any, out: Path, max_length: int | None) -> None:
    if max_length:
        tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out))


def save_causal_lm(run: Run, run_dir: Path, out: Path) -> list[str]:
    """The causal LM (vocabulary widened for a scratch run) + tokenizer + generation_config.json."""
    from transformers import GenerationConfig

    task, model = run.task, run.task.model
    notes: list[str] = []
    eos = task.eos_id
    suppress: list[int] = []
    if task.vocab is not None:
        suppress = widen_vocabulary(model, task.vocab, len(task.tokenizer))
        notes.append(f"scratch model: vocabulary widened from the {len(task.vocab)} tokens seen in training to the "
                     f"tokenizer's {len(task.tokenizer)}; the others read as [UNK] and are suppressed in generate()")
    if task.vocab is not None:  # the compact ids of a scratch model become the tokenizer's again
        model.config.update({"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos})
        model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                                   suppress_tokens=suppress)
    elif model.config.pad_token_id is None:  # a pretrained model keeps its own ids; batched generate needs a pad
        model.config.pad_token_id = eos
    model.config.use_cache = True
    model.eval()
    with quiet_hf_loading():
        model.save_pretrained(str(out))
    save_tokenizer(task.tokenizer, out, None)
    notes.append("prompts are tokenized without special tokens, as in training: tokenizer(text, "
                 "add_special_tokens=False)")
    return notes


@torch.no_grad()
def widen_vocabulary(model: nn.Module, vocab: VocabMap, size: int) -> list[int]:
    """Input/output embeddings from the kept ids to ``size`` rows (see the module docstring); returns the ids
    that were not kept."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is emb.weight:
        raise ValueError("export: a scratch model with tied embeddings cannot widen its vocabulary")
    kept = torch.tensor(vocab.kept, dtype=torch.long)
    unk = vocab.kept.index(vocab.unk_id)
    weight = emb.weight.detach()
    wide = weight[unk].expand(size, -1).clone()
    wide[kept] = weight
    out = torch.zeros(size, head.weight.shape[1], dtype=head.weight.dtype, device=head.weight.device)
    out[kept] = head.weight.detach()
    new_emb = nn.Embedding(size, weight.shape[1], device=weight.device, dtype=weight.dtype)
    new_emb.weight.copy_(wide)
    new_head = nn.Linear(head.weight.shape[1], size, bias=False, device=out.device, dtype=out.dtype)
    new_head.weight.copy_(out)
    model.set_input_embeddings(new_emb)
    model.set_output_embeddings(new_head)
    model.config.vocab_size = size
    dropped = torch.ones(size, dtype=torch.bool)
    dropped[kept] = False
    return torch.nonzero(dropped).flatten().tolist()


def save_peft_adapter(run: Run, out: Path, base_dir: Path) -> list[str]:
    """The run's adapter as PEFT files at ``out``, with module names of the ``hf`` export in ``base_dir``."""
    from .adapters.inject import adapter_config, adapter_layers, adapter_names
    from .adapters.io import CONFIG_NAME, LAYER_PREFIX, WEIGHTS_NAME, adapter_state, config_to_peft_dict
    from .export import PEFT_TYPES

    model, classify = run.task.model, run.cfg.task == "classify"
    names = adapter_names(model)
    if names != ["default"]:
        raise ValueError(f"--format peft: the run holds adapters {names}; export reads one adapter, 'default'")
    config = adapter_config(model, "default")
    if config.peft_type not in PEFT_TYPES:
        raise ValueError(f"--format peft: PEFT has no {config.peft_type} adapter (method {run.cfg.method!r}); "
                         "use --format hf or --format safetensors")
    rename = peft_module_name(classify)
    targets = [rename(n) for n, layer in adapter_layers(model) if "default" in layer.adapters]
    refuse_peft_targets(targets, classify, run.task)
    state = {(LAYER_PREFIX + rename(k[len(LAYER_PREFIX):]) if k.startswith(LAYER_PREFIX) else k): v
             for k, v in adapter_state(model, "default").items()}
    body = config_to_peft_dict(config, targets)
    if config.peft_type == "LORA":  # the base in base/ already holds PiSSA's residual: no init may touch it
        body["init_lora_weights"] = True
        for key in ("corda_config", "lora_ga_config"):
            body.pop(key, None)
    body["base_model_name_or_path"] = str(base_dir.resolve())
    body["task_type"] = None if classify else "CAUSAL_LM"
    write_safetensors_atomic(out / WEIGHTS_NAME, state, metadata={"format": "pt"})
    write_text_atomic(out / CONFIG_NAME, json.dumps(body, indent=2, sort_keys=True))
    return [(f"PEFT {config.peft_type} adapter on {len(targets)} modules, for the model in base/ "
            f"({'AutoModelForSequenceClassification' if classify else 'AutoModelForCausalLM'})")]


def peft_module_name(classify: bool) -> Callable[[str], str]:
    """Module path in the leantrain model -> module path in the exported transformers model."""
    if not classify:
        return lambda name: name
    old, new = CLASSIFY_RENAME
    return lambda name: new + name.removeprefix(old)


def refuse_peft_targets(targets: list[str], classify: bool, task: Any) -> None:
    """Adapters on modules the ``hf`` export rebuilds (the head; a widened vocabulary) cannot be kept apart."""
    rebuilt = ("classifier",) if classify else (("embed_tokens", "lm_head") if task.vocab is not None else ())
    hit = [t for t in targets if t.rsplit(".", 1)[-1] in rebuilt or t in rebuilt]
    if hit:
        raise ValueError(f"--format peft: the adapter wraps {hit[0]!r}, which the exported base rebuilds; "
                         "use --format hf or --format safetensors")
