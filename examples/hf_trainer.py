"""leantrain pieces inside Hugging Face ``transformers.Trainer``: LoRA injected by ``leantrain.adapters``, an
8-bit AdamW from ``leantrain.optim`` handed over as ``Trainer(optimizers=(optimizer, scheduler))``, and the
adapter saved in PEFT's file layout with ``leantrain.adapters.save``.

Nothing is downloaded: the tokenizer (and, with ``--model minilm``, the weights) come from the embedded MiniLM
package, and the data is leantrain's bundled VADER sentence set. ``--model tiny`` is a random 2-layer BERT
(hidden 32) for a quick check on CPU.

    .venv/bin/python examples/hf_trainer.py --model tiny --steps 30 --out /tmp/hf_trainer
    .venv/bin/python examples/hf_trainer.py --model minilm --steps 100 --out /tmp/hf_trainer
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing leantrain


def build_model(name: str, num_labels: int, seed: int = 0):
    """A ``BertForSequenceClassification``: the embedded MiniLM weights, or a random tiny BERT."""
    from transformers import AutoConfig, BertConfig, BertForSequenceClassification

    from leantrain.models import minilm_path

    torch.manual_seed(seed)
    if name == "tiny":
        base = AutoConfig.from_pretrained(str(minilm_path()))
        config = BertConfig(vocab_size=base.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config)
    return BertForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=num_labels,
                                                         use_safetensors=True)


class Rows(torch.utils.data.Dataset):
    """Tokenized sentences as dicts; ``DataCollatorWithPadding`` pads each batch."""

    def __init__(self, texts: list[str], labels: list[int], tokenizer, max_length: int):
        self.enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": int(self.labels[i])}


def run(model: str = "tiny", steps: int = 30, out: str | Path = "runs/hf_trainer", train_size: int = 64,
        batch_size: int = 8, lr: float = 5e-3, rank: int = 8, max_length: int = 32, seed: int = 0) -> dict:
    """Train LoRA + head with leantrain's AdamW8bit under ``Trainer``; return losses and the adapter folder."""
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        get_linear_schedule_with_warmup,
    )

    from leantrain import adapters
    from leantrain.config import TrainConfig
    from leantrain.data import load_classification
    from leantrain.models import load_tokenizer
    from leantrain.optim import AdamW8bit

    out = Path(out)
    data = load_classification(TrainConfig(data="vader", train_size=train_size, val_size=16))
    tokenizer = load_tokenizer("minilm")
    net = build_model(model, len(data.label_names), seed)
    # LoRA on every attention/MLP linear (the classifier head is skipped), base frozen; then train the head too.
    adapters.inject(net, adapters.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    for p in net.classifier.parameters():
        p.requires_grad_(True)
    lora = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    head = list(net.classifier.parameters())
    optimizer = AdamW8bit([{"params": lora}, {"params": head, "lr": max(lr, 1e-3)}], lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 10),
                                                num_training_steps=steps)
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=net, args=args, train_dataset=Rows(data.train.texts, data.train.labels, tokenizer,
                                                               max_length),
                      data_collator=DataCollatorWithPadding(tokenizer), optimizers=(optimizer, scheduler))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    adapter_dir = out / "adapter"
    adapters.save(net, adapter_dir)
    return {"losses": losses, "adapter_dir": str(adapter_dir), "model": net, "optimizer": optimizer,
            "tokenizer": tokenizer, "texts": data.val.texts, "num_labels": len(data.label_names)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--out", default="runs/hf_trainer")
    args = ap.parse_args(argv)
    result = run(args.model, args.steps, args.out, lr=args.lr)
    losses = result["losses"]
    k = max(1, len(losses) // 5)
    print(json.dumps({"first_losses_mean": sum(losses[:k]) / k, "last_losses_mean": sum(losses[-k:]) / k,
                      "adapter_dir": result["adapter_dir"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
