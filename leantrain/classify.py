"""Sentence classification task: the embedded encoder + a linear head on an offline labelled data set."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import class_metrics
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


def check_max_length(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """--max-length beyond the encoder's position embeddings would crash mid-forward: refuse it in one line."""
    limit = getattr(getattr(model.encoder, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.max_length > limit:
        raise ValueError(f"--max-length {cfg.max_length} is longer than the model's {limit} positions "
                         f"(max_position_embeddings of --model {cfg.model}); use --max-length {limit} or less")


class ClassificationTask:
    """Owns data, tokenizer and model; the training loop only asks it for batches, losses and evaluations."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.data = load_classification(cfg)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = build_classifier(cfg.model, len(self.data.label_names), cfg.seed,
                                      cfg.model_dropout).to(device)
        self.forward_model = self.model  # the training loop swaps in the DDP wrapper under torchrun
        check_max_length(cfg, self.model)
        self.predictions: tuple[list[int], list[int]] | None = None  # (true, predicted) of the last evaluation
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
        true, pred = [], []
        for batch in self.val_batches.in_order(64):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            count += len(batch["labels"])
            true += batch["labels"].tolist()
            pred += logits.argmax(-1).tolist()
        model.train(was_training)
        self.predictions = (true, pred)
        matrix = class_metrics.confusion_matrix(true, pred, len(self.data.label_names))
        return {"loss": loss_sum / max(1, count), "accuracy": correct / max(1, count),
                "macro_f1": class_metrics.macro_f1(matrix)}

    def data_counts(self) -> dict[str, int]:
        """Examples used (and left out) of the data; printed when the run starts."""
        return self.data.counts()

    def write_run_files(self, run_dir: Path) -> None:
        """Files written when a run starts (needed to rebuild the model later, e.g. by ``leantrain merge``)."""
        write_text_atomic(run_dir / "labels.json", json.dumps(self.data.label_names) + "\n")

    def save_artifacts(self, run_dir: Path, write: bool = True) -> None:
        """Called on every process (FSDP gathers are collectives); only the one with ``write`` writes files."""
        from .dist import full_tensor

        state = {k: full_tensor(v).detach().cpu().contiguous() for k, v in self.model.classifier.state_dict().items()}
        if write:
            write_safetensors_atomic(run_dir / "head.safetensors", state)
            if self.predictions is not None:
                from .report import plot_confusion

                matrix = class_metrics.confusion_matrix(*self.predictions, len(self.data.label_names))
                plot_confusion(matrix, self.data.label_names, Path(run_dir) / "confusion.png",
                               title=f"{self.cfg.method} + {self.cfg.optim} on {self.cfg.data}: validation")

    def summary(self) -> dict[str, Any]:
        """Baselines, the data counts and the per-class scores of the last evaluation."""
        scores = class_metrics.report(*self.predictions, self.data.label_names) if self.predictions else {}
        return {
            "majority_baseline_accuracy": self.data.majority_accuracy(),
            "tfidf_baseline_accuracy": tfidf_baseline(self.data),
            **self.data.counts(),
            **{k: v for k, v in scores.items() if k != "val_macro_f1"},
        }
