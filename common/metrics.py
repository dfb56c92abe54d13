"""Binary classification metrics for IDC (class 1 = IDC positive), in plain numpy.

Edge cases are defined, not accidental: with a single class present, balanced accuracy is the
recall of that class, precision/recall/F1 with an empty denominator are 0.0, and ROC AUC is
undefined (NaN, written as null in JSON).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LOSS = "loss"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced_accuracy"
PRECISION = "precision"
RECALL = "recall"
F1 = "f1"
AUC = "auc"
CONFUSION = "confusion"  # [[tn, fp], [fn, tp]]: rows true class, columns predicted class
EXAMPLES = "examples"
SCALAR_METRICS = (LOSS, ACCURACY, BALANCED_ACCURACY, PRECISION, RECALL, F1, AUC)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return the 2x2 count matrix, rows true class, columns predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    return np.bincount(2 * y_true + y_pred, minlength=4).reshape(2, 2)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic, ties counted half; NaN if one class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    pos = int(y_true.sum())
    neg = len(y_true) - pos
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties so that equal scores count half.
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y_true == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass(frozen=True)
class Evaluation:
    """A model's numbers on one set of labelled patches; :meth:`as_dict` keys: the names above."""

    loss: float  # mean cross-entropy per example
    examples: int
    accuracy: float
    balanced_accuracy: float
    precision: float
    recall: float
    f1: float
    auc: float  # NaN when only one class is present
    confusion: list[list[int]]  # [[tn, fp], [fn, tp]]

    def as_dict(self) -> dict[str, object]:
        """The JSON form: metric names as keys."""
        return asdict(self)


def score(
    y_true: np.ndarray, prob_pos: np.ndarray, loss: float, threshold: float = 0.5
) -> Evaluation:
    """Score P(IDC) against true labels at ``threshold``; ``loss`` is the mean loss."""
    y_true = np.asarray(y_true, dtype=np.int64)
    prob_pos = np.asarray(prob_pos, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    y_pred = (prob_pos >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y_true, y_pred)
    recalls = [_ratio(tn, tn + fp)] if tn + fp else []
    recalls += [_ratio(tp, tp + fn)] if tp + fn else []
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return Evaluation(
        loss=float(loss),
        examples=len(y_true),
        accuracy=_ratio(tn + tp, len(y_true)),
        balanced_accuracy=float(np.mean(recalls)),
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        auc=roc_auc(y_true, prob_pos),
        confusion=[[int(tn), int(fp)], [int(fn), int(tp)]],
    )


def json_safe(value: object) -> object:
    """Replace NaN and infinities by None, recursively, so json.dumps writes valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
