"""Scan one site's folder of IDC patches, decode it, and cache it.

Layouts, by where a file sits under ``root`` (``root`` may also be a folder holding
``IDC_regular_ps50_idx5/``); a patch name is ``<patient>_idx5_x<X>_y<Y>[_class<0|1>].png``:

=============================================================  ===================================
file                                                           accepted
=============================================================  ===================================
``<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png``    always (Kaggle: a folder of
                                                               patients)
``<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png``              labels optional (one patient's
                                                               folder)
``<patient>/<patient>_idx5_x<X>_y<Y>.png``                     labels optional (new slides)
``<patient>_idx5_x<X>_y<Y>.png``                               labels optional (one new slide)
=============================================================  ===================================

Labels are required by default (training, ``idc-client check``/``start``): an unlabelled
patch is never training data. ``require_labels=False`` (``idc-client predict``) scores every
layout above; such patches carry the label :data:`UNLABELLED`.

Real data is messy, and each case has one behaviour (counted and named in the
:class:`LoadReport` field in brackets, and logged once as a count with the first few names):

* not a patch name, or a file at a place no layout above accepts: ignored [``ignored``];
  hidden files are skipped silently;
* a class folder that disagrees with the class in the name, or a patient folder that
  disagrees with the patient in the name: not used [``mislabelled``];
* an unlabelled patch while labels are required: not used, never trained on [``no_label``];
* a patch smaller than 50x50 (slide borders): padded with the background colour at its
  top-left (policy ``"pad"``, the default) [``small_padded``] or dropped (``"skip"``)
  [``small_skipped``]; never stretched;
* a non-RGB mode (RGBA, palette, grey): converted to RGB [``converted``];
* an unreadable or truncated file, or one larger than 50x50 (a decompression bomb
  included: its header is read, never its pixels): skipped [``unreadable``];
* nothing usable at all: :class:`NoUsableData` naming the folder (and saying how many
  patches lacked a label, when that is why).

Decoding PNGs costs far more than a training step on a GPU, and the federated client runs in a
fresh process each round, so the decoded patches are cached once per folder as a packed uint8
array (memory-mapped on later loads, :mod:`common.patch_cache`), keyed by a fingerprint of
every used file's name, size and modification time plus the decode options: any change to the
files gives a new key, so a stale cache is never served. The first decode shows a progress bar
on a terminal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common import patch_cache
from common.patch_decode import PATCH, LoadOptions, decode_all
from common.patch_types import UNLABELLED, LoadReport, PatchRecord, PatchSet

__all__ = [
    "PATCH",
    "UNLABELLED",
    "LoadOptions",
    "LoadReport",
    "NoUsableData",
    "PatchRecord",
    "PatchSet",
    "load_patches",
    "resolve_root",
    "scan",
]

from common.errors import IdcError

log = logging.getLogger(__name__)

PATTERN = re.compile(
    r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)(?:_class(?P<label>[01]))?\.png$"
)
KAGGLE_SUBFOLDER = "IDC_regular_ps50_idx5"
CACHE_VERSION = 1
NAMED_IN_LOG = 5  # a log line names this many files, then "... and N more"


class NoUsableData(IdcError, ValueError):
    """A folder holds no usable patch; callers exit non-zero on it."""


def resolve_root(root: Path) -> Path:
    """Return the folder that holds the patient folders (or one patient's patches)."""
    root = Path(root)
    if not root.is_dir():
        raise NoUsableData(f"data folder {root} does not exist or is not a folder")
    inner = root / KAGGLE_SUBFOLDER
    return inner if inner.is_dir() else root


def named(items: Sequence[str], limit: int = NAMED_IN_LOG) -> str:
    """``a, b, c ... and N more``: a list short enough for one log line."""
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _classify(parts: tuple[str, ...], name: str, require_labels: bool) -> tuple[str, int]:
    """Return (kind, label) of one file: kind is patch, ignored, mislabelled or no-label."""
    match = PATTERN.match(name)
    if match is None:
        return "ignored", UNLABELLED
    patient, cls = match["patient"], match["label"]
    if cls is not None:
        if len(parts) == 2 and parts[1] in ("0", "1"):  # <patient>/<class>/
            ok = parts == (patient, cls)
        elif len(parts) == 1 and parts[0] in ("0", "1") and not require_labels:  # <class>/
            ok = parts[0] == cls
        else:
            return "ignored", int(cls)
        return ("patch" if ok else "mislabelled"), int(cls)
    if len(parts) > 1:
        return "ignored", UNLABELLED
    if parts and parts[0] != patient:
        return "mislabelled", UNLABELLED
    return ("no-label" if require_labels else "patch"), UNLABELLED


def _record(dirpath: str, rel: str, name: str, label: int) -> PatchRecord:
    match = PATTERN.match(name)
    if match is None:  # only called for names _classify accepted
        raise ValueError(f"not a patch name: {name}")
    st = os.stat(os.path.join(dirpath, name))
    x, y = int(match["x"]), int(match["y"])
    return PatchRecord(rel, match["patient"], x, y, label, st.st_size, st.st_mtime_ns)


def scan(root: Path, require_labels: bool = True) -> tuple[list[PatchRecord], LoadReport]:
    """List the patch files under ``root`` without decoding them (layouts: module doc)."""
    root = resolve_root(root)
    report = LoadReport(root=str(root))
    records: list[PatchRecord] = []
    lists = {
        "ignored": report.ignored,
        "mislabelled": report.mislabelled,
        "no-label": report.no_label,
    }
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        parts = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = "/".join((*parts, name))
            kind, label = _classify(parts, name, require_labels)
            if kind != "patch":
                lists[kind].append(rel)
                continue
            records.append(_record(dirpath, rel, name, label))
    _log_scan(report)
    return records, report


def _log_scan(report: LoadReport) -> None:
    if report.ignored:
        log.info(
            "ignored %d files (not a patch name or not in a patch layout): %s",
            len(report.ignored),
            named(report.ignored),
        )
    if report.mislabelled:
        log.warning(
            "not used %d patches whose folder disagrees with their name: %s",
            len(report.mislabelled),
            named(report.mislabelled),
        )
    if report.no_label:
        log.info(
            "not used %d patches with no label (training needs <patient>/<0|1>/): %s",
            len(report.no_label),
            named(report.no_label),
        )


def _fingerprint(records: Sequence[PatchRecord], with_times: bool, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for r in records:
        h.update(f"{r.path}\0{r.size}\0{r.mtime_ns if with_times else 0}\n".encode())
    return h.hexdigest()


def _build(
    root: Path,
    records: list[PatchRecord],
    report: LoadReport,
    options: LoadOptions,
    workers: int,
    progress: bool | None,
) -> tuple[np.ndarray, list[PatchRecord]]:
    images, statuses = decode_all(root, records, options, workers, progress)
    keep = []
    lists = {
        "unreadable": report.unreadable,
        "padded": report.small_padded,
        "small-skipped": report.small_skipped,
        "converted": report.converted,
    }
    for i, (rec, status) in enumerate(zip(records, statuses, strict=True)):
        if status in lists:
            lists[status].append(rec.path)
        if status not in ("unreadable", "small-skipped"):
            keep.append(i)
    if report.unreadable:
        log.warning(
            "skipped %d unreadable patches: %s", len(report.unreadable), named(report.unreadable)
        )
    return images[keep], [records[i] for i in keep]


def _fill_counts(report: LoadReport, kept: Sequence[PatchRecord]) -> None:
    report.usable = len(kept)
    report.patients = len({r.patient for r in kept})
    report.positives = sum(r.label == 1 for r in kept)
    report.negatives = sum(r.label == 0 for r in kept)
    report.unlabelled = sum(r.label == UNLABELLED for r in kept)


def _nothing_found(root: Path, report: LoadReport, require_labels: bool) -> NoUsableData:
    if report.no_label:
        return NoUsableData(
            f"no labelled patch in {root}: {len(report.no_label)} patches have no label "
            "(<patient>/<patient>_idx5_x<X>_y<Y>.png); training needs "
            "<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png; "
            "to score unlabelled patches use `idc-client predict`"
        )
    expected = (
        "<patient>/<0|1>/*_class<0|1>.png"
        if require_labels
        else "<patient>/*.png, <patient>/<0|1>/*.png, or one patient's folder"
    )
    return NoUsableData(f"no patch files in {root} (expected {expected})")


def load_patches(
    root: Path,
    cache_dir: Path | None = None,
    options: LoadOptions | None = None,
    workers: int = 1,
    require_labels: bool = True,
    progress: bool | None = None,
) -> PatchSet:
    """Load every usable patch under ``root``, through the cache when ``cache_dir`` is given.

    ``require_labels=False`` also loads unlabelled patches and one patient's folder (module
    doc). ``progress``: a bar on the first decode; ``None`` shows it on a terminal only.

    Raises
    ------
    NoUsableData
        When the folder holds no usable patch; the message names the folder.
    """
    options = options or LoadOptions()
    root = resolve_root(root)
    records, report = scan(root, require_labels)
    key = _fingerprint(records, True, f"v{CACHE_VERSION}{asdict(options)}{root.resolve()}")
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None and patch_cache.has_entry(entry):
        log.debug("patch cache hit %s", entry)
        return patch_cache.read_entry(entry)
    if not records:
        raise _nothing_found(root, report, require_labels)
    images, kept = _build(root, records, report, options, workers, progress)
    _fill_counts(report, kept)
    if not kept:
        raise NoUsableData(f"no usable patch in {root}: {len(report.unreadable)} unreadable")
    patches = PatchSet(
        images=images,
        labels=np.array([r.label for r in kept], dtype=np.int64),
        patients=np.array([r.patient for r in kept]),
        xs=np.array([r.x for r in kept], dtype=np.int32),
        ys=np.array([r.y for r in kept], dtype=np.int32),
        files=[r.path for r in kept],
        report=report,
        fingerprint=_fingerprint(records, False),
    )
    if entry is not None:
        patch_cache.write_entry(entry, patches)
        return patch_cache.read_entry(entry)
    return patches
