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
# the same two with every patient weighing alike (a patch weighs 1 / its patient's patches):
# a few patients hold hundreds of patches each, most hold tens
BAC_PER_PATIENT = "balanced_accuracy_per_patient"
AUC_PER_PATIENT = "auc_per_patient"
PER_PATIENT = (BAC_PER_PATIENT, AUC_PER_PATIENT)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Return the 2x2 count matrix, rows true class, columns predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    return np.bincount(2 * y_true + y_pred, minlength=4).reshape(2, 2)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def class_weights(
    y_true: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per example, its weight if IDC (else 0) and its weight if not IDC (else 0).

    ``weights``: per example, default 1 each; :func:`patient_weights` makes every patient weigh
    the same.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != y_true.shape:
        raise ValueError(f"labels {y_true.shape} and weights {w.shape} differ in shape")
    return w * (y_true == 1), w * (y_true == 0)


def roc_auc(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve by the rank-sum statistic, ties counted half; NaN if one class.

    ``weights``: per example (default 1 each); a pair of an IDC and a non-IDC example weighs the
    product of theirs, so :func:`patient_weights` makes every patient weigh the same.
    """
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = class_weights(y_true, weights)
    if scores.shape != pos.shape:
        raise ValueError(f"labels {pos.shape} and scores {scores.shape} differ in shape")
    if pos.sum() <= 0 or neg.sum() <= 0:
        return math.nan
    values, group = np.unique(scores, return_inverse=True)
    neg_at = np.bincount(group, weights=neg, minlength=len(values))  # non-IDC weight per score
    below = np.cumsum(neg_at) - neg_at
    won = (pos * (below[group] + 0.5 * neg_at[group])).sum()
    return float(won / (pos.sum() * neg.sum()))


def patient_weights(patients: np.ndarray) -> np.ndarray:
    """Per example, 1 / its patient's number of examples: every patient then weighs 1."""
    _, inverse, counts = np.unique(np.asarray(patients), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def balanced_accuracy(
    y_true: np.ndarray,
    prob_pos: np.ndarray,
    threshold: float = 0.5,
    weights: np.ndarray | None = None,
) -> float:
    """Mean over the classes present of the (weighted) share of that class called right."""
    called = np.asarray(prob_pos, dtype=np.float64) >= threshold
    pos, neg = class_weights(y_true, weights)
    recalls = [
        mass[right].sum() / mass.sum()
        for mass, right in ((neg, ~called), (pos, called))
        if mass.sum() > 0
    ]
    if not recalls:
        raise ValueError("cannot compute balanced accuracy on zero examples")
    return float(np.mean(recalls))


def per_patient(
    y_true: np.ndarray, prob_pos: np.ndarray, patients: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Balanced accuracy at ``threshold`` and AUC with every patient weighing the same."""
    w = patient_weights(patients)
    return {
        BAC_PER_PATIENT: balanced_accuracy(y_true, prob_pos, threshold, w),
        AUC_PER_PATIENT: roc_auc(y_true, prob_pos, w),
    }


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
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return Evaluation(
        loss=float(loss),
        examples=len(y_true),
        accuracy=_ratio(tn + tp, len(y_true)),
        balanced_accuracy=balanced_accuracy(y_true, prob_pos, threshold),
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
