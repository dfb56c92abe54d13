"""Seeded splits of patch indices: by patient (no patient in two parts) or by random patch.

Pure functions over arrays of patient ids and labels; no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_FRACTIONS = (0.6, 0.1, 0.3)  # train / validation / test: the paper's 70/30, val from train


@dataclass(frozen=True)
class Split:
    """Index arrays into one PatchSet."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(f"fractions must be (train > 0, val >= 0, test >= 0), got {fractions}")
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must add up to 1, got {fractions} (sum {sum(fractions)})")


def split_by_patient(
    patients: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> Split:
    """Assign whole patients to train / validation / test, stratified by class.

    Every part aims at its fraction of the patients and of the patches of each class. Patients
    differ widely (some hold no IDC patch, some mostly IDC, some 20 patches, some 300):
    unstratified, a 10% validation part of 23 patients once held 9.7% IDC against the test
    part's 49%, and chose epochs and recipes on that. The seed draws :data:`SHUFFLES` orders of
    the patients; each is dealt by :func:`_deal` and the deal nearest the fractions is kept.
    Every part with a non-zero fraction gets at least one patient when there are enough.
    """
    _check_fractions(fractions)
    patients, labels = np.asarray(patients), np.asarray(labels)
    if labels.shape != patients.shape:
        raise ValueError(f"labels {labels.shape} do not match patients {patients.shape}")
    ids, inverse = np.unique(patients, return_inverse=True)
    # per patient: its non-IDC and IDC patches and itself, each over the cohort's total
    counts = np.stack(
        [np.bincount(inverse, labels == c, len(ids)) for c in (0, 1)] + [np.ones(len(ids))],
        axis=1,
    )
    weight = counts / np.maximum(counts.sum(axis=0), 1)
    rng = np.random.default_rng(seed)
    deals = [_deal(weight, rng.permutation(len(ids)), fractions) for _ in range(SHUFFLES)]
    part_of, _ = min(deals, key=lambda deal: deal[1])
    per_patch = part_of[inverse]
    return Split(*(np.flatnonzero(per_patch == k) for k in range(3)))


SHUFFLES = 32  # seeded orders tried per split; the one dealt nearest the fractions is kept


def _deal(
    weight: np.ndarray, order: np.ndarray, fractions: tuple[float, float, float]
) -> tuple[np.ndarray, float]:
    """Deal patients in ``order`` greedily; return each one's part and the squared miss.

    ``weight``: per patient, its share of each quantity aimed at. Each patient goes to the part
    whose shortfall, in the patient's own mix of those quantities, is largest: the choice that
    lowers the summed squared shortfall most.
    """
    share = np.asarray(fractions)
    deficit = np.repeat(share[:, None], weight.shape[1], axis=1)  # per part and quantity
    part_of = np.empty(len(order), dtype=np.int64)
    wanted = [k for k in range(3) if share[k] > 0]
    taken = np.zeros(3, dtype=bool)
    for n, pid in enumerate(order):
        empty = [k for k in wanted if not taken[k]]
        if empty and len(order) - n <= len(empty):
            k = empty[0]  # the last patients go to parts that would otherwise stay empty
        else:
            k = int(np.argmax(np.where(share > 0, deficit @ weight[pid], -np.inf)))
        part_of[pid] = k
        taken[k] = True
        deficit[k] -= weight[pid]
    return part_of, float((deficit**2).sum())


def split_random(
    n: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> Split:
    """Split patch indices at random (the paper's protocol; patients leak across parts)."""
    _check_fractions(fractions)
    order = np.random.default_rng(seed).permutation(n)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return Split(np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:]))


def balance(indices: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Undersample the majority class among ``indices`` to the minority's count."""
    indices = np.asarray(indices)
    lab = np.asarray(labels)[indices]
    pos, neg = indices[lab == 1], indices[lab == 0]
    k = min(len(pos), len(neg))
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)])
    return np.sort(keep)
