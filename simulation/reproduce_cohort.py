"""The cohort of a reproduction: the patients every row works on, linked once, and its facts.

``OUT/cohort`` holds symlinks to the chosen patients' patch files (never copies) and their
decoded cache; ``--quick`` chooses a seeded subsample of patients. The paper row's balanced
set (every minority patch and as many random majority ones) is linked the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data import PatchRecord, load_patches, scan
from simulation import sim_runtime
from simulation.partitioners import MIN_PATIENTS


@dataclass
class Cohort:
    """The patients every row works on, linked under ``OUT/cohort``, and their facts."""

    source: Path
    data: Path
    cache: Path  # the decoded cohort, reused by the pooled rows
    facts: dict[str, Any]


def _choose_patients(records: Sequence[PatchRecord], keep: int | None, seed: int) -> list[str]:
    ids = sorted({r.patient for r in records})
    if keep is None or keep >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.array(ids), size=keep, replace=False).tolist())


def make_cohort(source: Path, out: Path, keep: int | None, seed: int, need: int = 1) -> Cohort:
    """Link the chosen patients of ``source`` into ``out/cohort``; decode them once.

    Raises
    ------
    ValueError
        Naming ``--data``, before any work, if it holds no patch or fewer than ``need`` patients.
    """
    records, report = scan(source)
    if not records:
        raise ValueError(
            f"--data {source}: no labelled patch in the Kaggle layout "
            "(PATIENT/0|1/PATIENT_idx5_xX_yY_classC.png); point --data at the patches' folder"
        )
    chosen = _choose_patients(records, keep, seed)
    if len(chosen) < need:
        raise ValueError(
            f"--data {source} has {len(chosen)} patients; the rows asked for need at least "
            f"{need} ({MIN_PATIENTS} per site); give more patients, or --rows paper,central"
        )
    kept = set(chosen)
    classes = {r.label for r in records if r.patient in kept}
    missing = [name for label, name in ((0, "IDC(-)"), (1, "IDC(+)")) if label not in classes]
    if missing:  # every row trains a classifier and scores it on both classes
        raise ValueError(
            f"--data {source}: the {len(chosen)} patients used have no {missing[0]} patch; "
            "every row needs both classes (class0 and class1 files)"
        )
    sites = sim_runtime.build_sites(source, records, [np.array(chosen)], out / "cohort")
    folder = sites / "site-000"
    patches = load_patches(folder / "data", cache_dir=folder / "cache", workers=2)
    facts = {
        "path": str(report.root),
        "source_patches": len(records),
        "source_patients": len({r.patient for r in records}),
        "patients": len(chosen),
        "patches": len(patches),
        "idc_patches": int(patches.labels.sum()),
        "digest": patches.fingerprint,
        "subsample_seed": seed if keep is not None else None,
    }
    return Cohort(source=source, data=folder / "data", cache=folder / "cache", facts=facts)


def link_balanced(cohort: Cohort, out: Path, seed: int) -> tuple[Path, dict[str, int]]:
    """The paper's balanced set: every minority patch and as many random majority ones."""
    records, _ = scan(cohort.data)
    labels = np.array([r.label for r in records])
    by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
    n = min(len(idx) for idx in by_class)
    if n == 0:
        raise ValueError(
            f"--data {cohort.source}: one class has no patch; the paper row needs both"
        )
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.choice(idx, n, replace=False) for idx in by_class]))
    root = cohort.data.resolve()
    for i in keep.tolist():
        dst = out / records[i].path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to((root / records[i].path).resolve())
    return out, {"per_class": int(n), "patches": int(2 * n)}
