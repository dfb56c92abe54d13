"""Scan one site's folder of IDC patches in the Kaggle layout, decode it, and cache it.

Layout: ``<root>/<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png``; ``root`` may also
be a folder holding ``IDC_regular_ps50_idx5/``. Real data is messy, and each case has one
behaviour (counted and named in the :class:`LoadReport`):

* a name that does not match the pattern, or a file at another depth: ignored;
* a class folder that disagrees with the class in the name, or a patient folder that
  disagrees with the patient in the name: reported as mislabelled and not used;
* a patch smaller than 50x50 (slide borders): padded with the background colour at its
  top-left (policy ``"pad"``, the default) or dropped (``"skip"``); never stretched;
* a non-RGB mode (RGBA, palette, grey): converted to RGB;
* an unreadable or truncated file, or one larger than 50x50 (a decompression bomb
  included: its header is read, never its pixels): counted unreadable and skipped;
* nothing usable at all: :class:`NoUsableData` naming the folder.

Decoding PNGs costs far more than a training step on a GPU, and the federated client runs in a
fresh process each round, so the decoded patches are cached once per folder as a packed uint8
array (memory-mapped on later loads), keyed by a fingerprint of every file's name, size and
modification time plus the decode options: any change to the files gives a new key, so a stale
cache is never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PATCH = 50
PATTERN = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")
KAGGLE_SUBFOLDER = "IDC_regular_ps50_idx5"
CACHE_VERSION = 1
# Below this many files a process pool costs more than it saves.
PARALLEL_MIN_FILES = 2000


class NoUsableData(ValueError):
    """A folder holds no usable patch; callers exit non-zero on it."""


@dataclass(frozen=True)
class PatchRecord:
    """One patch file, with the facts its name carries."""

    path: str  # relative to the scan root, with "/" separators
    patient: str
    x: int
    y: int
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class LoadOptions:
    """How to treat patches smaller than 50x50."""

    small: Literal["pad", "skip"] = "pad"
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.small not in ("pad", "skip"):
            raise ValueError(f"small-patch policy must be 'pad' or 'skip', got {self.small!r}")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background}")


@dataclass
class LoadReport:
    """What a scan and decode found; lists hold paths relative to the root."""

    root: str
    usable: int = 0
    patients: int = 0
    negatives: int = 0
    positives: int = 0
    ignored: list[str] = field(default_factory=list)
    mislabelled: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    small_padded: list[str] = field(default_factory=list)
    small_skipped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return a few human-readable lines."""
        return "\n".join(
            [
                f"folder: {self.root}",
                f"usable patches: {self.usable} from {self.patients} patients "
                f"({self.negatives} negative, {self.positives} positive)",
                f"smaller than 50x50: {len(self.small_padded)} padded, "
                f"{len(self.small_skipped)} skipped",
                f"converted to RGB: {len(self.converted)}",
                f"unreadable: {len(self.unreadable)}",
                f"mislabelled (folder and name disagree): {len(self.mislabelled)}",
                f"ignored (not a patch name or wrong place): {len(self.ignored)}",
            ]
        )


@dataclass
class PatchSet:
    """Decoded patches of one folder: images (N, 50, 50, 3) uint8 and per-patch facts."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    files: list[str]
    report: LoadReport
    fingerprint: str  # identity of the data set: names and sizes, not times

    def __len__(self) -> int:
        return len(self.labels)


def resolve_root(root: Path) -> Path:
    """Return the folder that holds the patient folders."""
    root = Path(root)
    if not root.is_dir():
        raise NoUsableData(f"data folder {root} does not exist or is not a folder")
    inner = root / KAGGLE_SUBFOLDER
    return inner if inner.is_dir() else root


def scan(root: Path) -> tuple[list[PatchRecord], LoadReport]:
    """List the patch files under ``root`` without decoding them."""
    root = resolve_root(root)
    report = LoadReport(root=str(root))
    records: list[PatchRecord] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            match = PATTERN.match(name)
            if match is None or len(rel_dir.parts) != 2 or rel_dir.parts[1] not in ("0", "1"):
                if not name.startswith("."):
                    report.ignored.append(rel)
                continue
            patient_dir, class_dir = rel_dir.parts
            if class_dir != match["label"] or patient_dir != match["patient"]:
                report.mislabelled.append(rel)
                continue
            st = os.stat(os.path.join(dirpath, name))
            records.append(
                PatchRecord(
                    rel,
                    match["patient"],
                    int(match["x"]),
                    int(match["y"]),
                    int(match["label"]),
                    st.st_size,
                    st.st_mtime_ns,
                )
            )
    for rel in report.ignored:
        log.info("ignored %s: not a patch name in <patient>/<0|1>/", rel)
    for rel in report.mislabelled:
        log.warning("not used %s: its folder disagrees with its name", rel)
    return records, report


def _fingerprint(records: Sequence[PatchRecord], with_times: bool, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for r in records:
        h.update(f"{r.path}\0{r.size}\0{r.mtime_ns if with_times else 0}\n".encode())
    return h.hexdigest()


def _decode_file(path: str, options: LoadOptions) -> tuple[np.ndarray | None, str]:
    """Decode one PNG; the status is ok, padded, converted, small-skipped or unreadable."""
    try:
        with Image.open(path) as img:
            # The header's size is checked before decoding: a huge image with a patch's name
            # (a decompression bomb) is counted unreadable without spending memory on it.
            if img.width > PATCH or img.height > PATCH:
                log.warning("unreadable patch %s: %dx%d is larger than 50x50", path, *img.size)
                return None, "unreadable"
            img.load()
            status = "ok" if img.mode == "RGB" else "converted"
            arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    # PIL raises all of these on bad files; DecompressionBombError (not an OSError) when the
    # header alone claims more pixels than PIL agrees to open.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        log.warning("unreadable patch %s: %s", path, exc)
        return None, "unreadable"
    h, w = arr.shape[:2]
    if (h, w) == (PATCH, PATCH):
        return arr, status
    if options.small == "skip":
        return None, "small-skipped"
    out = np.empty((PATCH, PATCH, 3), dtype=np.uint8)
    out[:] = options.background
    out[:h, :w] = arr
    return out, "padded"


def _decode_chunk(paths: list[str], options: LoadOptions) -> tuple[np.ndarray, list[str]]:
    images = np.zeros((len(paths), PATCH, PATCH, 3), dtype=np.uint8)
    statuses = []
    for i, p in enumerate(paths):
        arr, status = _decode_file(p, options)
        if arr is not None:
            images[i] = arr
        statuses.append(status)
    return images, statuses


def _decode_all(
    root: Path, records: Sequence[PatchRecord], options: LoadOptions, workers: int
) -> tuple[np.ndarray, list[str]]:
    paths = [str(root / r.path) for r in records]
    if workers <= 1 or len(paths) < PARALLEL_MIN_FILES:
        return _decode_chunk(paths, options)
    size = -(-len(paths) // (workers * 4))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_decode_chunk, chunks, [options] * len(chunks)))
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


def _build(
    root: Path, records: list[PatchRecord], report: LoadReport, options: LoadOptions, workers: int
) -> tuple[np.ndarray, list[PatchRecord]]:
    images, statuses = _decode_all(root, records, options, workers)
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
    return images[keep], [records[i] for i in keep]


def _fill_counts(report: LoadReport, kept: Sequence[PatchRecord]) -> None:
    report.usable = len(kept)
    report.patients = len({r.patient for r in kept})
    report.positives = sum(r.label for r in kept)
    report.negatives = report.usable - report.positives


def load_patches(
    root: Path,
    cache_dir: Path | None = None,
    options: LoadOptions | None = None,
    workers: int = 1,
) -> PatchSet:
    """Load every usable patch under ``root``, through the cache when ``cache_dir`` is given.

    Raises
    ------
    NoUsableData
        When the folder holds no usable patch; the message names the folder.
    """
    options = options or LoadOptions()
    root = resolve_root(root)
    records, report = scan(root)
    key = _fingerprint(records, True, f"v{CACHE_VERSION}{asdict(options)}{root.resolve()}")
    entry = Path(cache_dir) / key if cache_dir is not None else None
    if entry is not None and (entry / "meta.json").is_file():
        log.debug("patch cache hit %s", entry)
        return _read_cache(entry)
    if not records:
        raise NoUsableData(f"no patch files in {root} (expected <patient>/<0|1>/*.png)")
    images, kept = _build(root, records, report, options, workers)
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
        _write_cache(entry, patches)
        return _read_cache(entry)
    return patches


def _write_cache(entry: Path, patches: PatchSet) -> None:
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
        if not (entry / "meta.json").is_file():  # another process may have won the race
            raise
    _prune_siblings(entry, patches.report.root)


def _prune_siblings(entry: Path, root: str) -> None:
    """Drop older cache entries of the same folder so changed data does not pile up."""
    for other in entry.parent.iterdir():
        if other == entry or other.name.startswith(".") or not (other / "meta.json").is_file():
            continue
        try:
            if json.loads((other / "meta.json").read_text())["report"]["root"] == root:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError, KeyError):
            continue


def _read_cache(entry: Path) -> PatchSet:
    meta = json.loads((entry / "meta.json").read_text())
    facts = np.load(entry / "facts.npz")
    return PatchSet(
        images=np.load(entry / "images.npy", mmap_mode="r"),
        labels=facts["labels"],
        patients=facts["patients"],
        xs=facts["xs"],
        ys=facts["ys"],
        files=meta["files"],
        report=LoadReport(**meta["report"]),
        fingerprint=meta["fingerprint"],
    )
