"""What idc-client predict writes: the decision threshold and its source, the rows, the metrics.

The threshold turns P(IDC) into a call: ``predicted = probability >= threshold``. It comes from
the command line (``--threshold``), else from the model record's ``threshold`` (with its
``threshold_source``, e.g. the validation data it was chosen on), else the default 0.5; every
output names which one was used. The coordinator does not choose one today, so a record
without ``threshold`` is the normal case. On labelled data :func:`best_threshold` reports the
threshold that maximises balanced accuracy there: a fair choice only when those patches are
validation data, never the test set it is then scored on.

Labels are optional: metrics cover the labelled patches only, and are absent when none is.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data import UNLABELLED, PatchSet
from common.metrics import BALANCED_ACCURACY, score
from common.threshold import best_exact

DEFAULT_THRESHOLD = 0.5  # the default operating point of common.score
RECORD_KEY = "threshold"
RECORD_SOURCE_KEY = "threshold_source"


@dataclass(frozen=True)
class Threshold:
    """The decision threshold used, and where it came from (``origin``: a short code)."""

    value: float
    origin: str  # "command-line", "model-record" or "default"
    detail: str  # one human-readable line

    def as_dict(self) -> dict[str, Any]:
        """The form written to summary.json."""
        return {"value": self.value, "origin": self.origin, "detail": self.detail}


def threshold_arg(text: str) -> float:
    """Argparse type: a threshold strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def resolve_threshold(given: float | None, record: Mapping[str, Any] | None) -> Threshold:
    """Command line, else the model record's threshold, else the default.

    Raises
    ------
    ValueError
        If the model record holds a threshold that is not a number between 0 and 1.
    """
    if given is not None:
        return Threshold(given, "command-line", f"{given:g} (--threshold)")
    if record is not None and record.get(RECORD_KEY) is not None:
        value = record[RECORD_KEY]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ValueError(
                f"the model record's threshold {value!r} is not a number between 0 and 1; "
                "pass --threshold to override it"
            )
        source = record.get(RECORD_SOURCE_KEY) or "source not recorded"
        return Threshold(float(value), "model-record", f"{value:g} (model record: {source})")
    why = "unverified model, no record" if record is None else "the model record names none"
    return Threshold(DEFAULT_THRESHOLD, "default", f"{DEFAULT_THRESHOLD:g} (default: {why})")


def best_threshold(labels: np.ndarray, probs: np.ndarray) -> dict[str, float] | None:
    """The threshold maximising balanced accuracy on labelled patches; None with one class.

    Candidates are the probabilities themselves (``probability >= t`` is positive), so the
    returned balanced accuracy is exactly what that threshold gives on these patches. Ties go
    to the candidate nearest the default.
    """
    found = best_exact(labels, probs)
    if found is None:
        return None
    return {"threshold": found[0], BALANCED_ACCURACY: found[1]}


def _label_text(label: int) -> str:
    return "" if label == UNLABELLED else str(int(label))


def prediction_rows(patches: PatchSet, probs: np.ndarray, th: Threshold) -> list[dict[str, Any]]:
    """One row per patch; ``label`` is empty when the name carries none."""
    return [
        {
            "file": f,
            "patient": str(p),
            "x": int(x),
            "y": int(y),
            "probability": f"{pr:.6f}",
            "predicted": int(pr >= th.value),
            "label": _label_text(lab),
            "threshold": f"{th.value:g}",
            "threshold_source": th.origin,
        }
        for f, p, x, y, pr, lab in zip(
            patches.files,
            patches.patients,
            patches.xs,
            patches.ys,
            probs,
            patches.labels,
            strict=True,
        )
    ]


def patient_rows(patches: PatchSet, probs: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Per patient: patches, share predicted IDC, mean probability; truth when labelled."""
    rows = []
    for patient in sorted(set(patches.patients.tolist()), key=lambda p: (len(p), p)):
        sel = patches.patients == patient
        pred = probs[sel] >= threshold
        labels = patches.labels[sel]
        known = labels != UNLABELLED
        rows.append(
            {
                "patient": patient,
                "patches": int(sel.sum()),
                "predicted_idc": int(pred.sum()),
                "predicted_idc_share": float(pred.mean()),
                "mean_probability": float(probs[sel].mean()),
                "labelled": int(known.sum()),
                "true_idc": int(labels[known].sum()) if known.any() else "",
                "true_idc_share": float(labels[known].mean()) if known.any() else "",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write dict rows with a header from the first row's keys."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    """The baseline's metrics at ``threshold`` on labelled patches, and the best threshold."""
    p_true = np.where(labels == 1, probs, 1.0 - probs).astype(np.float64)
    loss = float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())
    return {
        **score(labels, probs, loss, threshold).as_dict(),
        "threshold": threshold,
        "best_threshold_on_these_patches": best_threshold(labels, probs),
    }


def model_caption(metadata: Mapping[str, Any] | None, path: Path) -> str:
    """One line naming the model on every figure: run, rounds, weights digest."""
    if metadata is None:
        return f"model {path.name}: UNVERIFIED plain weights, no run record"
    digest = str(metadata.get("weights_digest") or "")[:12]
    return (
        f"model {path.name}: run {metadata.get('run_id')}, {metadata.get('rounds')} rounds, "
        f"weights {digest}"
    )


def fmt(value: object) -> str:
    """A metric for the console: four decimals, or n/a."""
    return "n/a" if not isinstance(value, float) or math.isnan(value) else f"{value:.4f}"
