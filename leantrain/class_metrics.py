"""Classification scores from predictions: confusion matrix, per-class precision/recall/F1 and macro-F1.

Conventions (those of scikit-learn's ``classification_report`` with ``zero_division=0``): a class never predicted
has precision 0, a class never present has recall 0, and macro-F1 averages the F1 of the classes that occur in
the true labels or the predictions -- a training class absent from both says nothing about the model.
Plain Python on purpose: accuracy alone hides a model that never predicts a minority class.
"""
from __future__ import annotations

from typing import Any


def confusion_matrix(true: list[int], pred: list[int], classes: int) -> list[list[int]]:
    """``matrix[t][p]``: how many examples of true class ``t`` were predicted as ``p``."""
    matrix = [[0] * classes for _ in range(classes)]
    for t, p in zip(true, pred, strict=True):
        matrix[t][p] += 1
    return matrix


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def class_scores(matrix: list[list[int]]) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of every class (row/column ``i`` of ``matrix``)."""
    scores = []
    for i, row in enumerate(matrix):
        hit, support, predicted = row[i], sum(row), sum(r[i] for r in matrix)
        precision, recall = _ratio(hit, predicted), _ratio(hit, support)
        scores.append({"precision": precision, "recall": recall,
                       "f1": _ratio(2 * precision * recall, precision + recall), "support": support})
    return scores


def macro_f1(matrix: list[list[int]]) -> float:
    """Mean F1 over the classes that occur in the true labels or the predictions."""
    present = [i for i in range(len(matrix)) if sum(matrix[i]) or sum(r[i] for r in matrix)]
    scores = class_scores(matrix)
    return sum(scores[i]["f1"] for i in present) / len(present) if present else 0.0


def report(true: list[int], pred: list[int], names: list[str]) -> dict[str, Any]:
    """The metrics.json entries: macro-F1, per-class scores keyed by label name, the confusion matrix."""
    matrix = confusion_matrix(true, pred, len(names))
    return {
        "val_macro_f1": macro_f1(matrix),
        "val_per_class": dict(zip(names, class_scores(matrix))),
        "val_confusion_matrix": {"labels": names, "rows": "true label", "columns": "predicted label",
                                 "counts": matrix},
    }
