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
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> Split:
    """Assign whole patients to train / validation / test, aiming at the patch fractions.

    Patients are shuffled with the seed, then each goes to the part furthest below its target
    share of patches. Every part with a non-zero fraction gets at least one patient when there
    are enough patients.
    """
    _check_fractions(fractions)
    patients = np.asarray(patients)
    ids, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    targets = np.asarray(fractions) * len(patients)
    filled = np.zeros(3)
    part_of = np.empty(len(ids), dtype=np.int64)
    wanted = [k for k in range(3) if fractions[k] > 0]
    for n, pid in enumerate(order):
        empty = [k for k in wanted if filled[k] == 0]
        if empty and len(order) - n <= len(empty):
            k = empty[0]  # the last patients go to parts that would otherwise stay empty
        else:
            k = int(np.argmax(np.where(np.asarray(fractions) > 0, targets - filled, -np.inf)))
        part_of[pid] = k
        filled[k] += counts[pid]
    per_patch = part_of[inverse]
    return Split(*(np.flatnonzero(per_patch == k) for k in range(3)))


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
