"""``--task causal-lm``: next-token prediction on packed blocks, validation perplexity, a greedy sample.

Two ways to get a model:
  * fine-tuning (``--init-weights pretrained``, default): ``--model smollm2`` (the offline SmolLM2-135M) or a local
    HF causal-LM folder; the tokenizer comes from the same folder.
  * pre-training (``--init-weights scratch --arch llama --preset tiny``): a random LLaMA; ``--model`` then only
    names the tokenizer (``minilm``, the default: the always-installed BERT WordPiece; or ``smollm2`` / a folder).
    The vocabulary is cut to the token ids the training blocks use (``VocabMap``), so the embedding of a 2M-param
    model is not 30k x d; validation tokens never seen in training map to [UNK] (their share is reported).

Loss: mean cross-entropy over target tokens (mask True, position > 0 inside a block); validation perplexity =
exp(total target-token loss / number of target tokens), i.e. per token, not a mean of per-block perplexities.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import write_text_atomic
from ..config import TrainConfig
from ..precision import torch_dtype
from .data import (
    BlockBatcher,
    Blocks,
    VocabMap,
    end_of_text_id,
    load_documents,
    pack,
    split_documents,
    tokenize_documents,
)
from .models import build_scratch_lm, context_length, load_lm_tokenizer, load_pretrained_lm
from .presets import PRESETS, preset_key

SAMPLE_PROMPT_TOKENS = 8
SAMPLE_NEW_TOKENS = 32


def _base_quantizer(cfg: TrainConfig):
    """--quantize on a scratch model: quantize each Linear as it is built, not the finished full-precision base."""
    from ..quant import quantize_while_building, quantizes_before_method

    if not quantizes_before_method(cfg.quantize, cfg.init):
        return None
    return quantize_while_building(cfg.quantize, cfg.targets)


def token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over target positions, number of target positions)."""
    targets = input_ids[:, 1:]
    keep = loss_mask[:, 1:].to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none")
    keep_f = keep.reshape(-1).to(losses.dtype)
    return (losses * keep_f).sum(), keep_f.sum()


class CausalLMTask:
    """Owns tokenizer, packed blocks and the causal LM; ``leantrain.train`` asks it for batches and losses."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        if cfg.init_weights not in ("pretrained", "scratch"):
            raise ValueError(f"--init-weights {cfg.init_weights!r}: choose 'pretrained' or 'scratch'")
        self.scratch = cfg.init_weights == "scratch"
        if not self.scratch and (cfg.arch or cfg.preset):
            raise ValueError(f"--arch {cfg.arch!r} / --preset {cfg.preset!r} build a model from scratch: "
                             "add --init-weights scratch")
        if self.scratch:
            self._check_context(PRESETS[preset_key(cfg.preset)][4])
        self.tokenizer = load_lm_tokenizer(cfg.model)
        self.eos_id = end_of_text_id(self.tokenizer)
        model = None if self.scratch else load_pretrained_lm(cfg.model, torch_dtype(cfg.weight_dtype))
        if model is not None:
            self._check_context(context_length(model))

        train, val = self._blocks()
        # The kept vocabulary comes from all training blocks, before --train-size picks a subset.
        self.vocab: VocabMap | None = None
        self.val_unknown_share = 0.0
        if self.scratch:
            unk = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else self.eos_id
            self.vocab = VocabMap.from_blocks(train, [self.eos_id], unk)
            self.val_unknown_share = self.vocab.unknown_share(val.subset(cfg.val_size).ids)
            train = Blocks(self.vocab.to_compact(train.ids), train.mask)
            val = Blocks(self.vocab.to_compact(val.ids), val.mask)
            eos = int(self.vocab.to_compact(torch.tensor([self.eos_id]))[0])
            model = build_scratch_lm(cfg.arch, cfg.preset, len(self.vocab), cfg.seed, torch_dtype(cfg.weight_dtype),
                                     convert=_base_quantizer(cfg), bos_token_id=eos, eos_token_id=eos,
                                     pad_token_id=eos)
        train, val = train.subset(cfg.train_size), val.subset(cfg.val_size)
        self.train_blocks, self.val_blocks = train, val
        model.config.use_cache = False
        self.model = model.to(device)
        self._forward_model: torch.nn.Module | None = None
        self.train_batches = BlockBatcher(train, cfg.batch_size, cfg.seed)
        self.val_batches = BlockBatcher(val, cfg.batch_size, cfg.seed)
        self.before: dict[str, float] | None = self.evaluate() if cfg.extra.get("eval_before") else None
        self.sample_text: str | None = None

    def _check_context(self, limit: int | None) -> None:
        if limit is not None and self.cfg.max_length > limit:
            raise ValueError(f"--max-length {self.cfg.max_length} is longer than the model's context of {limit} "
                             "tokens (max_position_embeddings)")

    def _blocks(self) -> tuple[Blocks, Blocks]:
        cfg = self.cfg
        docs = load_documents(cfg.data)
        if cfg.val_data:
            train_docs, val_docs = docs, load_documents(cfg.val_data)
        else:
            train_docs, val_docs = split_documents(docs)
            if not val_docs:
                raise ValueError(f"--data {cfg.data!r} has {len(docs)} document(s); the validation split holds every "
                                 "20th, so give at least 20 or pass --val-data")
        out = []
        for name, part in (("training", train_docs), ("validation", val_docs)):
            ids, mask = tokenize_documents(part, self.tokenizer, self.eos_id)
            blocks = pack(ids, mask, cfg.max_length)
            if len(blocks) == 0:
                raise ValueError(f"--data {cfg.data!r}: the {name} split has {len(ids)} tokens, fewer than one block "
                                 f"of --max-length {cfg.max_length}")
            out.append(blocks)
        return out[0], out[1]

    # --- the interface leantrain.train uses ------------------------------------------------------------------
    @property
    def forward_model(self) -> torch.nn.Module:
        """What runs forward passes: the model, or the DDP/FSDP wrapper the loop installs under torchrun."""
        return self._forward_model if self._forward_model is not None else self.model

    @forward_model.setter
    def forward_model(self, module: torch.nn.Module) -> None:
        self._forward_model = module

    def batches_per_epoch(self) -> int:
        return len(self.train_batches)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self.train_batches.batch(index)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"].to(self.device)
        logits = self.forward_model(input_ids=ids).logits
        total, count = token_loss_sum(logits, ids, batch["loss_mask"])
        return total / count.clamp_min(1.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.forward_model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0.0
        for batch in self.val_batches.in_order(self.cfg.batch_size):
            ids = batch["input_ids"].to(self.device)
            s, n = token_loss_sum(model(input_ids=ids).logits, ids, batch["loss_mask"])
            total += float(s)
            count += float(n)
        model.train(was_training)
        if count == 0:
            raise ValueError("the validation blocks contain no target token (every token is masked)")
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": count}

    @torch.no_grad()
    def sample(self, new_tokens: int = SAMPLE_NEW_TOKENS) -> str:
        """Greedy continuation of the first validation block's first tokens (no KV cache: adapters stay simple)."""
        model = self.forward_model
        was_training = model.training
        model.eval()
        ids = self.val_blocks.ids[:1, :SAMPLE_PROMPT_TOKENS].to(self.device)
        eos = self.eos_id if self.vocab is None else int(self.vocab.to_compact(torch.tensor([self.eos_id]))[0])
        limit = context_length(self.model) or ids.shape[1] + new_tokens
        for _ in range(new_tokens):
            nxt = model(input_ids=ids[:, -limit:]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == eos:
                break
        model.train(was_training)
        out = ids[0].cpu()
        if self.vocab is not None:
            out = self.vocab.to_original(out)
        prompt = self.tokenizer.decode(out[:SAMPLE_PROMPT_TOKENS].tolist(), skip_special_tokens=True)
        rest = self.tokenizer.decode(out[SAMPLE_PROMPT_TOKENS:].tolist(), skip_special_tokens=True)
        return f"{prompt} >>> {rest}"

    def write_run_files(self, run_dir: Path) -> None:
        """lm.json: what is needed to rebuild the model and data (tokenizer source, kept vocabulary, config)."""
        info: dict[str, Any] = {"tokenizer": self.cfg.model, "block_length": self.cfg.max_length,
                                "split": "every 20th document is validation", "eos_id": self.eos_id,
                                "init_weights": self.cfg.init_weights}
        if self.vocab is not None:
            info["vocab_original_ids"] = self.vocab.kept
            info["model_config"] = json.loads(self.model.config.to_json_string())
        write_text_atomic(Path(run_dir) / "lm.json", json.dumps(info) + "\n")

    def save_artifacts(self, run_dir: Path, write: bool = True) -> None:
        """Every process samples (FSDP forwards are collectives); only the one with ``write`` writes and prints."""
        self.sample_text = self.sample()
        if write:
            write_text_atomic(Path(run_dir) / "sample.txt", self.sample_text + "\n")
            print(f"sample: {self.sample_text}")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train_blocks": len(self.train_blocks),
            "val_blocks": len(self.val_blocks),
            "block_length": self.cfg.max_length,
            "train_target_tokens": self.train_blocks.target_tokens(),
            "val_target_tokens": self.val_blocks.target_tokens(),
            "vocab_size": int(self.model.config.vocab_size),
            "sample": self.sample_text,
        }
        if self.vocab is not None:
            out["val_unknown_share"] = self.val_unknown_share
        if self.before is not None:
            out["val_loss_before"] = self.before["loss"]
            out["val_perplexity_before"] = self.before["perplexity"]
        return out
