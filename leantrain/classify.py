"""Sentence classification task: the embedded encoder + a linear head on an offline labelled data set."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .atomic import write_safetensors_atomic, write_text_atomic
from .config import TrainConfig
from .data import Batcher, ClassificationData, load_classification
from .models import build_classifier, load_tokenizer


def tfidf_baseline(data: ClassificationData) -> float | None:
    """TF-IDF + logistic regression accuracy on the same split (the bar a fine-tuned encoder should clear)."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x = vec.fit_transform(data.train.texts)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(x, data.train.labels)
    return float((clf.predict(vec.transform(data.val.texts)) == data.val.labels).mean())


class ClassificationTask:
    """Owns data, tokenizer and model; the training loop only asks it for batches, losses and evaluations."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.data = load_classification(cfg)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = build_classifier(cfg.model, len(self.data.label_names), cfg.seed,
                                      cfg.model_dropout).to(device)
        self.forward_model = self.model  # the training loop swaps in the DDP wrapper under torchrun
        self.train_batches = Batcher(self.data.train, self.tokenizer, cfg.max_length, cfg.batch_size, cfg.seed)
        self.val_batches = Batcher(self.data.val, self.tokenizer, cfg.max_length, cfg.batch_size, cfg.seed)

    def batches_per_epoch(self) -> int:
        return len(self.train_batches)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self.train_batches.batch(index)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.forward_model(batch["input_ids"], batch["attention_mask"]).float()
        return F.cross_entropy(logits, batch["labels"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.forward_model
        was_training = model.training
        model.eval()
        correct, loss_sum, count = 0, 0.0, 0
        for batch in self.val_batches.in_order(64):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(batch["labels"])
        model.train(was_training)
        return {"loss": loss_sum / max(1, count), "accuracy": correct / max(1, count)}

    def write_run_files(self, run_dir: Path) -> None:
        """Files written when a run starts (needed to rebuild the model later, e.g. by ``leantrain merge``)."""
        write_text_atomic(run_dir / "labels.json", json.dumps(self.data.label_names) + "\n")

    def save_artifacts(self, run_dir: Path, write: bool = True) -> None:
        """Called on every process (FSDP gathers are collectives); only the one with ``write`` writes files."""
        from .dist import full_tensor

        state = {k: full_tensor(v).detach().cpu().contiguous() for k, v in self.model.classifier.state_dict().items()}
        if write:
            write_safetensors_atomic(run_dir / "head.safetensors", state)

    def summary(self) -> dict[str, Any]:
        return {
            "majority_baseline_accuracy": self.data.majority_accuracy(),
            "tfidf_baseline_accuracy": tfidf_baseline(self.data),
            "train_examples": len(self.data.train),
            "val_examples": len(self.data.val),
        }
