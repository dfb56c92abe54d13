"""The on-disk cache of decoded patches: one folder per key, written atomically, read mapped.

An entry is ``<cache>/<key>/`` holding ``images.npy`` (N, 50, 50, 3) uint8, ``facts.npz``
(labels, patients, xs, ys) and ``meta.json`` (files, load report, fingerprint). The key is
chosen by :func:`common.data.load_patches`; this module only stores and reads what it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from common.patch_types import PatchSet


def has_entry(entry: Path) -> bool:
    """Whether a whole entry exists (``meta.json`` is written last)."""
    return (entry / "meta.json").is_file()


def write_entry(entry: Path, patches: PatchSet) -> None:
    """Write atomically: a crash leaves either no entry or a whole one."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        np.save(tmp / "images.npy", patches.images)
        np.savez(
            tmp / "facts.npz",
            labels=patches.labels,
            patients=patches.patients,
            xs=patches.xs,
            ys=patches.ys,
        )
        meta = {
            "files": patches.files,
            "report": asdict(patches.report),
            "fingerprint": patches.fingerprint,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not has_entry(entry):  # another process may have won the race
            raise
    _prune_siblings(entry, patches.report.root)


def _prune_siblings(entry: Path, root: str) -> None:
    """Drop older cache entries of the same folder so changed data does not pile up."""
    for other in entry.parent.iterdir():
        if other == entry or other.name.startswith(".") or not has_entry(other):
            continue
        try:
            if json.loads((other / "meta.json").read_text())["report"]["root"] == root:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError, KeyError):
            continue


def read_entry(entry: Path) -> PatchSet:
    """Read an entry; the images stay on disk, memory-mapped."""
    from common.patch_types import LoadReport, PatchSet

    meta = json.loads((entry / "meta.json").read_text())
    facts = np.load(entry / "facts.npz")
    known = {f.name for f in fields(LoadReport)}  # entries from older versions lack new fields
    return PatchSet(
        images=np.load(entry / "images.npy", mmap_mode="r"),
        labels=facts["labels"],
        patients=facts["patients"],
        xs=facts["xs"],
        ys=facts["ys"],
        files=meta["files"],
        report=LoadReport(**{k: v for k, v in meta["report"].items() if k in known}),
        fingerprint=meta["fingerprint"],
    )
