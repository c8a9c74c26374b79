"""Classification data: deterministic de-duplicated stratified splits, tokenization and batching.

The split never depends on the training seed (it uses SPLIT_SEED), so runs with different seeds are evaluated
on the same sentences. Batch order is a pure function of (seed, epoch, position), so a resumed run sees exactly
the batches an uninterrupted run would -- no data-loader state to checkpoint.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .sources import BUNDLED, column, load_source, prefetch, read_rows

SPLIT_SEED = 1234
VAL_FRACTION = 0.2


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ClassificationData:
    train: Split
    val: Split
    label_names: list[str]
    duplicates_dropped: int = 0  # repeated texts of --data removed before the split (first occurrence kept)
    available: tuple[int, int] = (0, 0)  # (train, val) examples before --train-size/--val-size

    def counts(self) -> dict[str, int]:
        """What the run uses and what it left out: printed at the start and stored in metrics.json."""
        return {"train_examples": len(self.train), "val_examples": len(self.val),
                "train_examples_available": self.available[0], "val_examples_available": self.available[1],
                "duplicates_dropped": self.duplicates_dropped}

    def majority_accuracy(self) -> float:
        """Accuracy of always predicting the most common training label, measured on the validation split."""
        top = Counter(self.train.labels).most_common(1)[0][0]
        return sum(int(y == top) for y in self.val.labels) / max(1, len(self.val))


def deduplicate(texts: list[str], labels: list) -> tuple[list[str], list]:
    """Keep the first occurrence of each text so no sentence can land in both splits."""
    seen: set[str] = set()
    out_t, out_y = [], []
    for t, y in zip(texts, labels):
        if t not in seen:
            seen.add(t)
            out_t.append(t)
            out_y.append(y)
    return out_t, out_y


def stratified_indices(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (kept, rest) with `fraction` of every class kept (at least one per class)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    kept, rest = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction)) if len(idx) > 1 else len(idx)
        kept += idx[:k]
        rest += idx[k:]
    return sorted(kept), sorted(rest)


def subset(split: Split, size: int | None) -> Split:
    if size is None or size >= len(split):
        return split
    kept, _ = stratified_indices(split.labels, size / len(split), SPLIT_SEED)
    return Split([split.texts[i] for i in kept], [split.labels[i] for i in kept])


def _is_fraction(label: str) -> bool:
    """A number that is not a whole number ("0.75", "1e-3"): a continuous target, not a category."""
    try:
        value = float(label)
    except ValueError:
        return False
    return not math.isfinite(value) or not value.is_integer()


def label_names(labels: list[str], where: str) -> list[str]:
    """The sorted class names of user labels (already stripped); continuous numbers are refused in one line."""
    fractions = [y for y in labels if _is_fraction(y)]
    if fractions:
        raise ValueError(f"{where}: label {fractions[0]!r} is a continuous number; classification needs "
                         "categories (whole-number class ids or names)")
    return sorted(set(labels))


def _encode_labels(labels: list, names: list[str] | None, where: str = "data") -> tuple[list[int], list[str]]:
    """Class ids of ``labels``; user labels are stripped (" billing " is "billing") and named in sorted order."""
    if names is not None:
        return [int(y) for y in labels], names
    stripped = [str(y).strip() for y in labels]
    names = label_names(stripped, where)
    index = {n: i for i, n in enumerate(names)}
    return [index[y] for y in stripped], names


def _encode_validation(labels: list, names: list[str], where: str) -> list[int]:
    """Validation labels in the training label set; one seen only in validation would be an untrained class."""
    stripped = [str(y).strip() for y in labels]
    unseen = sorted(set(stripped) - set(names))
    if unseen:
        raise ValueError(f"{where}: validation label(s) {unseen} never occur in the training data")
    index = {n: i for i, n in enumerate(names)}
    return [index[y] for y in stripped]


def prefetch_data(cfg: TrainConfig) -> None:
    """Fetch every bundled data set ``cfg`` reads (training and validation) into the cache."""
    for name in (cfg.data, cfg.val_data):
        prefetch(name)


def require_columns(rows: list, names: dict[str, str], path: str) -> None:
    """Every wanted column exists in the file; else one line naming the file, the option and the columns it has."""
    found = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    missing = [f"{name!r} ({option})" for option, name in names.items() if name not in found]
    if missing:
        raise ValueError(f"data file {path!r} has no column {' or '.join(missing)}; its columns: "
                         f"{', '.join(map(repr, found)) or 'none'}")


def read_labelled(name: str, cfg: TrainConfig) -> tuple[list[str], list, list[str] | None]:
    """(texts, labels, label_names or None): a bundled data set, or --text-column/--label-column of a user file."""
    if name in BUNDLED:
        return load_source(name)
    rows = read_rows(name)
    require_columns(rows, {"--text-column": cfg.text_column, "--label-column": cfg.label_column}, name)
    return column(rows, cfg.text_column, name), column(rows, cfg.label_column, name), None


def load_classification(cfg: TrainConfig) -> ClassificationData:
    """The train/validation splits ``cfg`` asks for, with the counts of what was used and dropped."""
    texts, labels, names = read_labelled(cfg.data, cfg)
    rows = len(texts)
    texts, labels = deduplicate(texts, labels)
    if cfg.val_data:
        vt, vy, val_names = read_labelled(cfg.val_data, cfg)
        ids, names = _encode_labels(labels, names, f"data {cfg.data!r}")
        vids = [int(y) for y in vy] if val_names is not None else _encode_validation(vy, names, cfg.val_data)
        train = Split(texts, ids)
        val = Split(list(vt), vids)
    else:
        ids, names = _encode_labels(labels, names, f"data {cfg.data!r}")
        if len(set(ids)) < 2:
            raise ValueError(f"data {cfg.data!r} has a single label {names[0]!r}; need at least two classes")
        val_idx, train_idx = stratified_indices(ids, VAL_FRACTION, SPLIT_SEED)
        train = Split([texts[i] for i in train_idx], [ids[i] for i in train_idx])
        val = Split([texts[i] for i in val_idx], [ids[i] for i in val_idx])
    return ClassificationData(subset(train, cfg.train_size), subset(val, cfg.val_size), names,
                              duplicates_dropped=rows - len(texts), available=(len(train), len(val)))


class Batcher:
    """Tokenizes once, then serves padded batches in an order fixed by (seed, epoch)."""

    def __init__(self, split: Split, tokenizer, max_length: int, batch_size: int, seed: int):
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
        self.ids: list[list[int]] = encoded["input_ids"]
        self.labels = torch.tensor(split.labels, dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id or 0
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        """Full batches per epoch (the ragged tail is dropped so every step sees the same batch size)."""
        return max(1, len(self.ids) // self.batch_size)

    def _collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = self.ids[i]
            input_ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[rows]}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """The `index`-th training batch counted from the start of training (epochs wrap around)."""
        epoch, pos = divmod(index, len(self))
        order = torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        rows = order[pos * self.batch_size: (pos + 1) * self.batch_size].tolist()
        return self._collate(rows)

    def in_order(self, batch_size: int):
        """Evaluation batches in file order, including the last partial one."""
        for start in range(0, len(self.ids), batch_size):
            yield self._collate(list(range(start, min(start + batch_size, len(self.ids)))))
