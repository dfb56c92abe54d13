"""Patient-level partitions of a data set into virtual sites: pure functions, no tensors.

Every partitioner takes patient ids (and, where it needs them, per-patient facts) and returns
one sorted array of patient ids per site. A patient lands in exactly one site, every patient
lands somewhere, and the same seed gives the same partition. Each site gets at least
``min_patients`` patients (default 3), because a site splits its own patients into
train / validation / test and needs one patient in each part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Ids = Sequence[str] | np.ndarray
Shares = Sequence[float] | np.ndarray
PARTITIONS = ("iid", "label-skew", "size-skew", "site-shift")
MIN_PATIENTS = 3  # one each for a site's own train, validation and test parts


@dataclass(frozen=True)
class PatientTable:
    """One row per patient: its id, its number of patches and its share of IDC patches."""

    ids: np.ndarray
    patches: np.ndarray
    positive_share: np.ndarray

    @classmethod
    def from_patches(cls, patients: Ids, labels: Sequence[int] | np.ndarray) -> PatientTable:
        """Summarise per-patch patient ids and labels (0/1) by patient, ids sorted."""
        who, lab = np.asarray(patients).astype(str), np.asarray(labels, dtype=np.float64)
        if who.shape != lab.shape:
            raise ValueError(f"{len(who)} patient ids but {len(lab)} labels")
        ids, inverse, counts = np.unique(who, return_inverse=True, return_counts=True)
        positives = np.bincount(inverse, weights=lab, minlength=len(ids))
        return cls(ids, counts, positives / np.maximum(counts, 1))


def _check(ids: np.ndarray, sites: int, min_patients: int) -> None:
    if not isinstance(sites, int) or isinstance(sites, bool) or sites < 1:
        raise ValueError(f"sites must be an int >= 1, got {sites!r}")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("patient ids must be unique (one row per patient)")
    if len(ids) < sites * min_patients:
        raise ValueError(
            f"{len(ids)} patients cannot fill {sites} sites with at least "
            f"{min_patients} patients each; use fewer sites"
        )


def _parts(ids: np.ndarray, site_of: np.ndarray, sites: int) -> list[np.ndarray]:
    return [np.sort(ids[site_of == k]) for k in range(sites)]


def _top_up(site_of: np.ndarray, sites: int, min_patients: int, rng: np.random.Generator) -> None:
    """Move random patients from the largest sites to sites below the minimum, in place."""
    counts = np.bincount(site_of, minlength=sites)
    for k in np.flatnonzero(counts < min_patients):
        while counts[k] < min_patients:
            donor = int(np.argmax(counts))
            moved = rng.choice(np.flatnonzero(site_of == donor))
            site_of[moved] = k
            counts[donor] -= 1
            counts[k] += 1


def iid(ids: Ids, sites: int, seed: int = 0, min_patients: int = MIN_PATIENTS) -> list[np.ndarray]:
    """Shuffle patients and deal them out evenly (site sizes differ by at most one)."""
    arr = np.asarray(ids).astype(str)
    _check(arr, sites, min_patients)
    order = np.random.default_rng(seed).permutation(len(arr))
    site_of = np.empty(len(arr), dtype=np.int64)
    site_of[order] = np.arange(len(arr)) % sites
    return _parts(arr, site_of, sites)


def label_skew(
    ids: Ids,
    positive_share: Shares,
    sites: int,
    alpha: float,
    seed: int = 0,
    min_patients: int = MIN_PATIENTS,
) -> list[np.ndarray]:
    """Dirichlet(``alpha``) label skew over patients.

    Patients are ranked by their share of IDC patches and halved into IDC-rich and IDC-poor
    ones; each half is spread over the sites by its own draw from a symmetric Dirichlet with
    concentration ``alpha``. Large ``alpha`` gives every site about the same mix; small
    ``alpha`` gives most IDC-rich patients to a few sites.
    """
    arr = np.asarray(ids).astype(str)
    share = np.asarray(positive_share, dtype=np.float64)
    if share.shape != arr.shape:
        raise ValueError(f"{len(arr)} patients but {len(share)} positive shares")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    _check(arr, sites, min_patients)
    rng = np.random.default_rng(seed)
    # Ties broken at random, so a data set of equal shares still halves cleanly.
    rank = np.lexsort((rng.random(len(arr)), share))
    rich = np.zeros(len(arr), dtype=bool)
    rich[rank[len(arr) // 2 :]] = True
    site_of = np.empty(len(arr), dtype=np.int64)
    for group in (np.flatnonzero(~rich), np.flatnonzero(rich)):
        members = rng.permutation(group)
        cuts = (np.cumsum(rng.dirichlet(np.full(sites, alpha))) * len(members)).astype(int)
        for k, part in enumerate(np.split(members, cuts[:-1])):
            site_of[part] = k
    _top_up(site_of, sites, min_patients, rng)
    return _parts(arr, site_of, sites)


def size_skew(
    ids: Ids,
    sites: int,
    exponent: float = 1.0,
    seed: int = 0,
    min_patients: int = MIN_PATIENTS,
) -> list[np.ndarray]:
    """Site sizes (in patients) from a power law: the site of rank r gets about ``r**-exponent``.

    Every site first gets ``min_patients``; the rest are shared in proportion to the power
    law (largest remainders), the ranks are shuffled over the sites, and the patients are
    shuffled before they are dealt out. ``exponent=0`` is an even split.
    """
    arr = np.asarray(ids).astype(str)
    if not (exponent >= 0 and np.isfinite(exponent)):
        raise ValueError(f"exponent must be a number >= 0, got {exponent!r}")
    _check(arr, sites, min_patients)
    rng = np.random.default_rng(seed)
    weights = rng.permutation(np.arange(1, sites + 1, dtype=np.float64) ** -exponent)
    spare = len(arr) - sites * min_patients
    exact = spare * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = spare - int(sizes.sum())
    sizes[np.argsort(sizes - exact, kind="stable")[:short]] += 1
    sizes += min_patients
    site_of = rng.permutation(np.repeat(np.arange(sites), sizes))
    return _parts(arr, site_of, sites)


def site_shift(
    ids: Ids, site_of: Mapping[str, int], sites: int, min_patients: int = MIN_PATIENTS
) -> list[np.ndarray]:
    """Each synthetic patient goes to the site whose stain profile it was drawn with.

    ``site_of`` is the ``site_of`` map of a synth output's ``synth.json`` (patient id ->
    stain site, 0-based); ``sites`` must equal the number of stain sites among ``ids``.
    """
    arr = np.asarray(ids).astype(str)
    _check(arr, sites, 1)
    missing = [p for p in arr.tolist() if p not in site_of]
    if missing:
        raise ValueError(
            f"patients {missing[:5]} have no stain site in synth.json "
            "(site-shift needs a synth output)"
        )
    which = np.array([int(site_of[p]) for p in arr.tolist()], dtype=np.int64)
    found = sorted(set(which.tolist()))
    if found != list(range(sites)):
        raise ValueError(
            f"site-shift: the data has stain sites {found}, so --sites must be "
            f"{len(found)}, got {sites}"
        )
    counts = np.bincount(which, minlength=sites)
    if counts.min() < min_patients:
        raise ValueError(
            f"site-shift: stain site {int(np.argmin(counts))} has "
            f"{int(counts.min())} patients, fewer than {min_patients}"
        )
    return _parts(arr, which, sites)


def partition(
    kind: str,
    table: PatientTable,
    sites: int,
    seed: int = 0,
    *,
    alpha: float = 0.5,
    exponent: float = 1.0,
    site_of: Mapping[str, int] | None = None,
    min_patients: int = MIN_PATIENTS,
) -> list[np.ndarray]:
    """Dispatch to the partitioner named ``kind`` (one of :data:`PARTITIONS`)."""
    if kind == "iid":
        return iid(table.ids, sites, seed, min_patients)
    if kind == "label-skew":
        return label_skew(table.ids, table.positive_share, sites, alpha, seed, min_patients)
    if kind == "size-skew":
        return size_skew(table.ids, sites, exponent, seed, min_patients)
    if kind == "site-shift":
        if site_of is None:
            raise ValueError("partition 'site-shift' needs the synth output's site_of map")
        return site_shift(table.ids, site_of, sites, min_patients)
    raise ValueError(f"partition must be one of {PARTITIONS}, got {kind!r}")


def site_positive_shares(parts: Sequence[np.ndarray], table: PatientTable) -> np.ndarray:
    """Each site's share of IDC patches (patch-weighted over its patients)."""
    row = {p: i for i, p in enumerate(table.ids.tolist())}
    out = []
    for part in parts:
        idx = np.array([row[p] for p in np.asarray(part).tolist()], dtype=np.int64)
        n = table.patches[idx]
        out.append(float((table.positive_share[idx] * n).sum() / max(int(n.sum()), 1)))
    return np.array(out)
