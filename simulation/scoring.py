"""Where a simulated row's P(IDC) becomes calls: at 0.5 and at a validation-chosen threshold.

Every scored model gets both: the headline metrics at the fixed threshold 0.5 (top-level
keys, as before) and the same metrics at the threshold chosen on validation patients only,
under :data:`AT_CHOSEN` with that threshold and its source. The test patients never choose.

- In-process models (the paper row, the centralized candidates, pooled baselines, local-only
  sites): :func:`common.threshold.best_exact` on their own validation patients' probabilities.
- Federated runs: the coordinator's own choice (summed 50-bin validation histograms of the
  last round, recorded in the final model's record), as deployed. Where those histograms
  cannot resolve the model (:func:`common.threshold.resolves`: P(IDC) nearly constant, every
  validation patch in one bin) or name no threshold, the exact choice on the pooled
  validation patients of the participating sites, scored with the final model, and the
  source says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.config import Norm
from common.data import PatchSet
from common.dataset import PatchDataset, make_loader
from common.metrics import (
    ACCURACY,
    AUC,
    BALANCED_ACCURACY,
    CONFUSION,
    EXAMPLES,
    F1,
    PER_PATIENT,
    per_patient,
)
from common.metrics import score as score_at
from common.model import build_model, model_kind
from common.site_data import EVAL_BATCH, Loader, set_weights
from common.threshold import (
    DEFAULT,
    VALIDATION_BAC,
    Choice,
    best_edge,
    choose_exact,
    resolves,
)
from common.training import predict, resolve_device

AT_CHOSEN = "at_validation_threshold"
HEADLINE = (ACCURACY, BALANCED_ACCURACY, F1, AUC)
KEPT = (*HEADLINE, *PER_PATIENT)  # what a scored row keeps of the metrics
Probs = tuple[np.ndarray, np.ndarray, float]  # labels, P(IDC), mean loss


def validation_score(at_chosen: Mapping[str, Any]) -> float:
    """Validation balanced accuracy at a model's validation-chosen threshold (NaN if none).

    Not at 0.5: a candidate whose P(IDC) all sits on one side of 0.5 would score chance there
    however well it ranks, and it is scored on the test at its chosen threshold anyway.
    """
    value = at_chosen["validation_balanced_accuracy"]
    return float("nan") if value is None else float(value)


def best_on_validation(scores: Sequence[float]) -> int:
    """Index of the best validation score; the first when none is a number."""
    return int(np.nanargmax(scores)) if any(np.isfinite(s) for s in scores) else 0


def eval_loader(patches: PatchSet, idx: np.ndarray) -> Loader:
    """A plain, unshuffled loader over ``idx``."""
    return make_loader(PatchDataset(patches.images, patches.labels, idx), EVAL_BATCH, False)


def probabilities(model: torch.nn.Module, patches: PatchSet, idx: np.ndarray) -> Probs:
    """Labels, P(IDC) and mean loss of ``model`` on ``patches[idx]``."""
    labels, probs, loss = predict(model, eval_loader(patches, idx), resolve_device())
    return labels, probs, float(loss) / max(len(labels), 1)


def on_validation(
    model: torch.nn.Module, patches: PatchSet, val_idx: np.ndarray, where: str
) -> Choice:
    """The exact threshold chosen on ``patches[val_idx]`` (``where``: which patients)."""
    if len(val_idx) == 0:
        return Choice(DEFAULT, f"default {DEFAULT:g}: no validation patches ({where})")
    labels, probs, _ = probabilities(model, patches, val_idx)
    return choose_exact(labels, probs, where)


def both(test: Probs, choice: Choice | None, patients: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics at 0.5 (top level) and, given a choice, at its threshold (:data:`AT_CHOSEN`).

    ``patients``: per patch, its patient; then each part also holds the balanced accuracy and
    AUC with every patient weighing the same (:data:`common.metrics.PER_PATIENT`).
    """
    labels, probs, loss = test

    def at(t: float) -> dict[str, Any]:
        out: dict[str, Any] = score_at(labels, probs, loss, t).as_dict()
        if patients is not None:
            out |= per_patient(labels, probs, patients, t)
        return out

    out = at(DEFAULT)
    if choice is not None:
        chosen = at(choice.threshold)
        out[AT_CHOSEN] = {
            "threshold": choice.threshold,
            "threshold_source": choice.source,
            "validation_balanced_accuracy": choice.balanced_accuracy,
            **{k: chosen[k] for k in (*KEPT, CONFUSION, EXAMPLES) if k in chosen},
        }
    return out


def headline(res: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a row keeps: headline metrics, confusion, count, the chosen-threshold part."""
    keep = (*KEPT, CONFUSION, EXAMPLES, AT_CHOSEN)
    return {k: res[k] for k in keep if k in res}


def as_model(arrays: Mapping[str, np.ndarray], norm: Norm) -> Any:
    """The network of exchanged arrays, rebuilt with those weights."""
    return set_weights(build_model(norm, seed=0, kind=model_kind(arrays)), arrays)


def metrics(
    model: Any, patches: PatchSet, idx: np.ndarray, choice: Choice | None = None
) -> dict[str, Any]:
    """Headline metrics of ``model`` on ``patches[idx]`` at 0.5 and at ``choice`` if given."""
    return headline(both(probabilities(model, patches, idx), choice, patches.patients[idx]))


def score(
    arrays: dict[str, np.ndarray],
    norm: Norm,
    patches: PatchSet,
    idx: np.ndarray,
    choice: Choice | None = None,
) -> dict[str, Any]:
    """:func:`metrics` of a model given as exchanged arrays."""
    return metrics(as_model(arrays, norm), patches, idx, choice)


def mean_spread(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each kept metric over ``rows`` (NaNs skipped) and its standard deviation."""
    out: dict[str, Any] = {}
    for key in KEPT:
        vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if len(vals) else float("nan")
        out[f"{key}_std"] = float(vals.std()) if len(vals) else float("nan")
    return out


def coordinator_choice(
    record: Mapping[str, Any] | None, rounds: Sequence[Mapping[str, Any]]
) -> Choice | None:
    """The coordinator's recorded threshold, or None where its histograms could not resolve.

    A record that carries the threshold's validation balanced accuracy was chosen on
    histograms that resolved (the last round's or the refinement's, :mod:`server.refine`);
    an older record is judged by the last round's histograms.
    """
    record = record or {}
    value = record.get("threshold")
    if not isinstance(value, int | float) or not 0 < value < 1:
        return None
    told = record.get("threshold_source", "source not recorded")
    source = f"coordinator, summed validation histograms: {told}"
    bacc = record.get(VALIDATION_BAC)
    if isinstance(bacc, int | float):
        return Choice(float(value), source, float(bacc))
    last = (rounds[-1] if rounds else {}).get("validation") or {}
    pos, neg = last.get("positives"), last.get("negatives")
    if pos is None or neg is None or not resolves(pos, neg):
        return None
    best = best_edge(pos, neg)  # its balanced accuracy there, when it is the histograms' edge
    found = best[1] if best is not None and abs(best[0] - value) < 1e-9 else None
    return Choice(float(value), source, found)


def federated_choice(
    record: Mapping[str, Any] | None,
    rounds: Sequence[Mapping[str, Any]],
    model: torch.nn.Module,
    patches: PatchSet,
    val_idx: np.ndarray,
) -> Choice:
    """The run's own threshold; else the exact one on the pooled validation patients."""
    chosen = coordinator_choice(record, rounds)
    if chosen is not None:
        return chosen
    why = "the coordinator's histograms could not resolve this model"
    return on_validation(model, patches, val_idx, f"pooled validation of the sites; {why}")
