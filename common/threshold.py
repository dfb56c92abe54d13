"""The decision threshold chosen on validation, from histograms that hold no per-patch data.

Each site bins P(IDC) of its validation patches into :data:`BINS` equal bins on [0, 1] (bin
``i`` holds ``i/BINS <= p < (i+1)/BINS``, the last bin also ``p = 1``), once for positives and
once for negatives, and sends the two count vectors with its evaluation. The coordinator sums
them over sites and picks the bin edge ``t`` that maximises balanced accuracy of
``p >= t`` on the summed counts: with counts per bin that is exact for every edge, so the
choice is as good as one over the pooled patches restricted to those edges (a step of
1/BINS), while no single patch's probability leaves its site.

Without both classes (or without any histogram, e.g. sites of an older idc-fl) there is
nothing to choose on: the default 0.5 is kept and the source says why.

What the histograms cannot resolve: two patches in one bin are the same to them. A model whose
P(IDC) is nearly constant (a short or heavily noised run: every patch near the class prior,
yet ranked well, AUC 0.7 or more) puts every validation patch in one or two bins; then every
edge calls (nearly) all patches one class, :func:`best_edge` finds balanced accuracy 0.5 at
best and the tie keeps 0.5, which calls every patch the majority class. :func:`resolves`
says when that is so. Where the probabilities themselves are at hand (the simulation scores
its own validation patients in process), :func:`best_exact` takes the candidates from the
unique probabilities and has no such blind spot.

Refinement (:mod:`server.refine`): after the last round the coordinator asks the sites once
more for the final model's histograms, still :data:`BINS` bins, on the narrower range
:func:`zoom_range` reads off the last round's sums (around the best coarse edge, where the
patches actually fell). A patch
outside the range is counted in the first or last bin, which keeps every interior edge exact;
edges inside the range become up to :data:`BINS` times finer. The range is never narrower
than :data:`MIN_SPAN` (one coarse bin), so one query never resolves P(IDC) finer than
``1 / BINS**2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.metrics import class_weights

BINS = 50
DEFAULT = 0.5
MIN_SPAN = 1.0 / BINS  # the narrowest range a refinement may ask for: one coarse bin
WORTH_REFINING = 0.5  # an unresolved model: refine when its patches span at most this much
ZOOM_HALF_WIDTH = 0.1  # a resolved one: refine this far either side of its best coarse edge
Range = tuple[float, float]


def histograms(
    labels: np.ndarray, probs: np.ndarray, span: Range = (0.0, 1.0)
) -> tuple[list[int], list[int]]:
    """Counts of positives and of negatives per P(IDC) bin (:data:`BINS` bins on ``span``).

    A probability outside ``span`` counts in the nearest end bin (see the module's note).
    """
    lo, hi = check_span(span)
    labels = np.asarray(labels)
    probs = np.clip(np.asarray(probs, dtype=np.float64), lo, hi)
    edges = np.linspace(lo, hi, BINS + 1)
    pos, _ = np.histogram(probs[labels == 1], bins=edges)
    neg, _ = np.histogram(probs[labels == 0], bins=edges)
    return [int(c) for c in pos], [int(c) for c in neg]


def check_span(span: object) -> Range:
    """A histogram range from another party: ``[lo, hi]`` in [0, 1], :data:`MIN_SPAN` or wider."""
    if not isinstance(span, list | tuple) or len(span) != 2:
        raise ValueError(f"a histogram range must be two numbers [lo, hi], got {span!r}")
    lo, hi = span
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
            raise ValueError(f"a histogram range must hold finite numbers, got {span!r}")
    if not (0.0 <= lo < hi <= 1.0) or hi - lo < MIN_SPAN - 1e-12:
        raise ValueError(
            f"a histogram range must satisfy 0 <= lo < hi <= 1 and hi - lo >= {MIN_SPAN:g}, "
            f"got {list(span)!r}"
        )
    return float(lo), float(hi)


def zoom_range(positives: Sequence[int], negatives: Sequence[int]) -> Range | None:
    """Where to refine: around the best coarse edge, within the bins the patches fill.

    The range is the occupied bins within :data:`ZOOM_HALF_WIDTH` of the best edge (at most
    0.2 wide: bins of 0.004), so a model whose P(IDC) crowds near its threshold gets finer
    edges there however widely the rest spreads. Where the histograms cannot resolve the
    model (every patch in one bin) it is the bins the patches fill, if they span at most
    :data:`WORTH_REFINING`. None when there is nothing to choose on (one class).
    """
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    if len(pos) != BINS or pos.sum() == 0 or neg.sum() == 0:
        return None
    used = np.flatnonzero(pos + neg)
    lo, hi = used[0] / BINS, (used[-1] + 1) / BINS
    found = best_edge(positives, negatives) if resolves(positives, negatives) else None
    if found is not None:
        a, b = max(lo, found[0] - ZOOM_HALF_WIDTH), min(hi, found[0] + ZOOM_HALF_WIDTH)
        if b - a >= MIN_SPAN - 1e-12:
            return float(a), float(b)
    return (float(lo), float(hi)) if hi - lo <= WORTH_REFINING + 1e-12 else None


def check_counts(name: str, counts: Sequence[float]) -> list[int]:
    """A histogram from another party: :data:`BINS` whole non-negative counts, else ValueError."""
    if len(counts) != BINS:
        raise ValueError(f"{name!r} must hold {BINS} counts, got {len(counts)}")
    out = []
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int | float):
            raise ValueError(f"{name!r} must hold numbers, got {type(c).__name__}")
        if not (np.isfinite(c) and c >= 0 and float(c).is_integer()):
            raise ValueError(f"{name!r} must hold whole counts >= 0, got {c!r}")
        out.append(int(c))
    return out


@dataclass(frozen=True)
class Choice:
    """The chosen threshold, where it comes from, and its balanced accuracy there (or None)."""

    threshold: float
    source: str
    balanced_accuracy: float | None = None

    def record(self) -> dict[str, object]:
        """The model record's keys (``threshold``, ``threshold_source``, and the accuracy)."""
        out: dict[str, object] = {"threshold": self.threshold, "threshold_source": self.source}
        if self.balanced_accuracy is not None:
            out[VALIDATION_BAC] = self.balanced_accuracy
        return out


VALIDATION_BAC = "threshold_validation_balanced_accuracy"


def best_edge(
    positives: Sequence[int], negatives: Sequence[int], span: Range = (0.0, 1.0)
) -> tuple[float, float] | None:
    """The bin edge maximising balanced accuracy of ``p >= edge``, and that accuracy.

    ``span``: the range the histograms were binned on. Ties go to the edge nearest the
    default 0.5; None without both classes.
    """
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    k = np.arange(1, BINS)  # interior edges: 0 and 1 call (nearly) everything one class
    recall = pos[::-1].cumsum()[::-1][k] / pos.sum()  # positives at or above edge k
    specificity = neg.cumsum()[k - 1] / neg.sum()  # negatives below edge k
    bacc = (recall + specificity) / 2
    best = np.flatnonzero(np.isclose(bacc, bacc.max(), rtol=0, atol=1e-12))
    lo, hi = span
    edges = lo + k * (hi - lo) / BINS
    i = best[np.argmin(np.abs(edges[best] - DEFAULT))]
    return float(edges[i]), float(bacc[i])


def choose(
    positives: Sequence[int] | None, negatives: Sequence[int] | None, sites: int, round_: int
) -> Choice:
    """The threshold for a final model from the summed validation histograms of ``round_``."""
    if positives is None or negatives is None or sites == 0:
        return Choice(
            DEFAULT, f"default {DEFAULT:g}: no site sent validation histograms (older idc-fl)"
        )
    patches = int(sum(positives) + sum(negatives))
    where = f"{patches} patches, {sites} site{'s' if sites != 1 else ''}, round {round_}"
    found = best_edge(positives, negatives)
    if found is None:
        return Choice(DEFAULT, f"default {DEFAULT:g}: validation held one class only ({where})")
    if not resolves(positives, negatives):  # say so rather than dress 0.5 up as a choice
        return Choice(
            DEFAULT,
            f"default {DEFAULT:g}: the validation histograms put every patch in one bin, "
            f"nothing to choose on ({where})",
        )
    edge, bacc = found
    return Choice(edge, f"validation: {where}", bacc)


def choose_refined(
    positives: Sequence[int], negatives: Sequence[int], span: Range, sites: int, round_: int
) -> Choice | None:
    """The threshold from a refinement's summed histograms on ``span``; None if they cannot tell."""
    found = best_edge(positives, negatives, span)
    if found is None or not resolves(positives, negatives):
        return None
    patches = int(sum(positives) + sum(negatives))
    edge, bacc = found
    where = (
        f"{patches} patches, {sites} site{'s' if sites != 1 else ''}, round {round_}, "
        f"refined on [{span[0]:g}, {span[1]:g}]"
    )
    return Choice(edge, f"validation: {where}", bacc)


def resolves(positives: Sequence[int], negatives: Sequence[int]) -> bool:
    """Whether summed histograms can separate anything: both classes, two or more bins used."""
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    return bool(pos.sum() > 0 and neg.sum() > 0 and np.count_nonzero(pos + neg) >= 2)


def best_exact(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, float] | None:
    """The threshold maximising balanced accuracy of ``p >= t`` on these patches, and that accuracy.

    Candidates are the unique probabilities themselves, so the accuracy returned is exactly
    what the threshold gives on these patches, however close together they are. ``weights``:
    per patch (default 1 each; :func:`common.metrics.patient_weights` makes each patient weigh
    the same within its class). Ties go to the candidate nearest the default 0.5; None without
    both classes.
    """
    probs = np.asarray(probs, dtype=np.float64)
    pos, neg = class_weights(labels, weights)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return None
    cand, group = np.unique(probs, return_inverse=True)
    pos_at = np.bincount(group, weights=pos, minlength=len(cand))
    neg_at = np.bincount(group, weights=neg, minlength=len(cand))
    recall = pos_at[::-1].cumsum()[::-1] / pos.sum()  # positives at or above each candidate
    specificity = (neg_at.cumsum() - neg_at) / neg.sum()  # negatives below it
    bacc = (recall + specificity) / 2
    best = np.flatnonzero(np.isclose(bacc, bacc.max(), rtol=0, atol=1e-12))
    k = best[np.argmin(np.abs(cand[best] - DEFAULT))]
    return float(cand[k]), float(bacc[k])


def choose_exact(labels: np.ndarray, probs: np.ndarray, where: str) -> Choice:
    """The threshold chosen on validation patches' own probabilities (``where``: which ones)."""
    found = best_exact(labels, probs)
    if found is None:
        return Choice(DEFAULT, f"default {DEFAULT:g}: validation held one class only ({where})")
    t, bacc = found
    return Choice(t, f"validation, exact: {len(np.asarray(labels))} patches, {where}", bacc)
