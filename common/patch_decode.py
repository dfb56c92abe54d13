"""Decode patch PNGs to 50x50 RGB uint8, one behaviour per odd file, in parallel, with progress.

Each file gets a status: ``ok``, ``converted`` (non-RGB mode), ``padded`` (smaller than 50x50,
filled with the background colour at its top-left), ``small-skipped`` (smaller, policy
``"skip"``) or ``unreadable`` (truncated, not an image, or larger than 50x50). What the statuses
mean for a data set is decided by :mod:`common.data`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from common.patch_types import PatchRecord

log = logging.getLogger(__name__)

PATCH = 50
# Below this many files a process pool costs more than it saves.
PARALLEL_MIN_FILES = 2000
CHUNK = 256  # files decoded between two progress-bar updates
PROGRESS_DELAY_S = 0.5  # a decode quicker than this shows no bar at all


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


def _decode_file(path: str, options: LoadOptions) -> tuple[np.ndarray | None, str]:
    """Decode one PNG; the status is ok, padded, converted, small-skipped or unreadable."""
    try:
        with Image.open(path) as img:
            # The header's size is checked before decoding: a huge image with a patch's name
            # (a decompression bomb) is counted unreadable without spending memory on it.
            if img.width > PATCH or img.height > PATCH:
                log.debug("unreadable patch %s: %dx%d is larger than 50x50", path, *img.size)
                return None, "unreadable"
            img.load()
            status = "ok" if img.mode == "RGB" else "converted"
            arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    # PIL raises all of these on bad files; DecompressionBombError (not an OSError) when the
    # header alone claims more pixels than PIL agrees to open. One summary warning per load
    # names the files; the reason is for debugging.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        log.debug("unreadable patch %s: %s", path, exc)
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


def _progress(total: int, progress: bool | None) -> tqdm:
    # None: a bar only on a terminal (tqdm's rule), so logs and captured output stay clean.
    return tqdm(
        total=total,
        desc="decoding patches (first load only, then cached)",
        unit="patch",
        disable=None if progress is None else not progress,
        delay=PROGRESS_DELAY_S,
        leave=False,
        file=sys.stderr,
    )


def decode_all(
    root: Path,
    records: Sequence[PatchRecord],
    options: LoadOptions,
    workers: int,
    progress: bool | None,
) -> tuple[np.ndarray, list[str]]:
    """Decode every record's file in order; ``progress`` None: a bar on a terminal only."""
    paths = [str(root / r.path) for r in records]
    parallel = workers > 1 and len(paths) >= PARALLEL_MIN_FILES
    size = -(-len(paths) // (workers * 4)) if parallel else CHUNK
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    parts = []
    with _progress(len(paths), progress) as bar:
        if parallel:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for part in pool.map(_decode_chunk, chunks, [options] * len(chunks)):
                    parts.append(part)
                    bar.update(len(part[1]))
        else:
            for chunk in chunks:
                parts.append(_decode_chunk(chunk, options))
                bar.update(len(chunk))
    if not parts:
        return np.zeros((0, PATCH, PATCH, 3), dtype=np.uint8), []
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]
