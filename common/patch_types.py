"""The records of a patch folder: one file, what a scan found, the decoded set.

They live below the loader (:mod:`common.data`), its decoder and its cache, which all use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNLABELLED = -1  # the label of a patch whose name carries none


@dataclass(frozen=True)
class PatchRecord:
    """One patch file, with the facts its name carries (``label`` may be UNLABELLED)."""

    path: str  # relative to the scan root, with "/" separators
    patient: str
    x: int
    y: int
    label: int
    size: int
    mtime_ns: int


@dataclass
class LoadReport:
    """What a scan and decode found; lists hold paths relative to the root."""

    root: str
    usable: int = 0
    patients: int = 0
    negatives: int = 0
    positives: int = 0
    unlabelled: int = 0  # usable patches with no label (labels optional only)
    ignored: list[str] = field(default_factory=list)
    mislabelled: list[str] = field(default_factory=list)
    no_label: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    small_padded: list[str] = field(default_factory=list)
    small_skipped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return a few human-readable lines."""
        unlabelled = f", {self.unlabelled} unlabelled" if self.unlabelled else ""
        lines = [
            f"folder: {self.root}",
            f"usable patches: {self.usable} from {self.patients} patients "
            f"({self.negatives} negative, {self.positives} positive{unlabelled})",
            f"smaller than 50x50: {len(self.small_padded)} padded, "
            f"{len(self.small_skipped)} skipped",
            f"converted to RGB: {len(self.converted)}",
            f"unreadable: {len(self.unreadable)}",
            f"mislabelled (folder and name disagree): {len(self.mislabelled)}",
            f"ignored (not a patch name or wrong place): {len(self.ignored)}",
        ]
        if self.no_label:
            lines.append(f"no label (never used for training): {len(self.no_label)}")
        return "\n".join(lines)


@dataclass
class PatchSet:
    """Decoded patches of one folder: images (N, 50, 50, 3) uint8 and per-patch facts."""

    images: np.ndarray
    labels: np.ndarray  # 0, 1, or UNLABELLED
    patients: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    files: list[str]
    report: LoadReport
    fingerprint: str  # identity of the data set: names and sizes, not times

    def __len__(self) -> int:
        return len(self.labels)
