"""Synthetic H&E-like IDC patches written in the Kaggle breast-histopathology folder layout."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.fileio import atomic_write
from simulation.synth_render import render_patient

logger = logging.getLogger(__name__)

FIRST_PATIENT_ID = 20000  # above every real Kaggle id (8863..16896), so the two never collide
MANIFEST = "synth.json"
FORMAT = "idc-synth"
VERSION = 1


@dataclass(frozen=True)
class SynthSpec:
    """What to synthesize; every field is checked on construction."""

    patients: int = 12
    patches_per_patient: tuple[int, int] = (40, 80)
    seed: int = 0
    sites: int = 1
    site_shift: float = 0.0
    positive_fraction: tuple[float, float] = (0.1, 0.6)

    def __post_init__(self) -> None:
        _check(
            _is_int(self.patients) and self.patients >= 1, "patients", self.patients, "an int >= 1"
        )
        lo, hi = _pair("patches_per_patient", self.patches_per_patient)
        _check(
            _is_int(lo) and _is_int(hi) and 1 <= lo <= hi,
            "patches_per_patient",
            self.patches_per_patient,
            "ints with 1 <= low <= high",
        )
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an int >= 0")
        _check(
            _is_int(self.sites) and 1 <= self.sites <= self.patients,
            "sites",
            self.sites,
            f"an int in [1, patients={self.patients}]",
        )
        _check(
            _is_real(self.site_shift) and 0.0 <= self.site_shift <= 1.0,
            "site_shift",
            self.site_shift,
            "a number in [0, 1] (0: no shift, 1: the strongest)",
        )
        lo, hi = _pair("positive_fraction", self.positive_fraction)
        _check(
            _is_real(lo) and _is_real(hi) and 0.0 <= lo <= hi <= 1.0,
            "positive_fraction",
            self.positive_fraction,
            "numbers with 0 <= low <= high <= 1",
        )


@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize` wrote."""

    out: Path
    patches: int
    positives: int
    patients: list[str]
    site_of: dict[str, int]
    seconds: float


def _check(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SynthSpec.{field} must be {rule}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _pair(field: str, value: Any) -> tuple[Any, Any]:
    _check(isinstance(value, tuple | list) and len(value) == 2, field, value, "a (low, high) pair")
    return value[0], value[1]


def patient_id(index: int) -> str:
    """Return the folder name of the patient with this 0-based index."""
    return str(FIRST_PATIENT_ID + index)


def synthesize(out: Path, spec: SynthSpec, workers: int = 1) -> SynthSummary:
    """Write ``spec.patients`` synthetic patients under ``out``, plus a ``synth.json`` manifest.

    Parameters
    ----------
    out : Path
        Target folder: missing, empty, or an earlier synth output (which is replaced).
    spec : SynthSpec
        What to generate; the same spec always gives byte-identical files.
    workers : int
        Processes to spread patients over; the output does not depend on it.

    Returns
    -------
    SynthSummary
        Counts, patient ids and the site of each patient.

    Raises
    ------
    ValueError
        If ``out`` is a file or holds anything but an earlier synth output, or ``workers``
        is not an int >= 1.
    """
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    start = time.perf_counter()
    out = Path(out)
    _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    site_of = {patient_id(i): i % spec.sites for i in range(spec.patients)}
    # Written first, marked incomplete, so that an interrupted run can still be replaced.
    _write_manifest(out, spec, site_of, None)
    counts = list(_run(out, spec, workers))
    patches, positives = (sum(c) for c in zip(*counts, strict=True))
    _write_manifest(out, spec, site_of, (patches, positives))
    seconds = time.perf_counter() - start
    logger.info(
        "synthesized %d patches (%d positive) of %d patients in %.2f s (%.0f/s)",
        patches,
        positives,
        spec.patients,
        seconds,
        patches / max(seconds, 1e-9),
    )
    return SynthSummary(out, patches, positives, list(site_of), site_of, seconds)


def _run(out: Path, spec: SynthSpec, workers: int) -> Iterator[tuple[int, int]]:
    n = spec.patients
    if workers == 1 or n == 1:
        yield from (write_patient(out, spec, i) for i in range(n))
        return
    with ProcessPoolExecutor(max_workers=min(workers, n)) as pool:
        yield from pool.map(write_patient, [out] * n, [spec] * n, range(n))


def _clear_previous(out: Path) -> None:
    """Remove an earlier synth output from ``out``; refuse anything else found there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out must be a folder, got the file {out}")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    try:
        previous = json.loads((out / MANIFEST).read_text())
        ours = set(previous["site_of"]) if previous["format"] == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        ours = None
    if ours is None:
        raise ValueError(f"out {out} is not empty and holds no {MANIFEST}; refusing to write")
    strangers = sorted(entries - ours - {MANIFEST, MANIFEST + ".tmp"})
    if strangers:
        raise ValueError(f"out {out} holds entries no synth run wrote: {strangers[:5]}")
    for name in sorted(ours & entries):  # names listed in the folder: nothing outside it
        shutil.rmtree(out / name)
    (out / MANIFEST).unlink()
    (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)


def _write_manifest(
    out: Path, spec: SynthSpec, site_of: dict[str, int], counts: tuple[int, int] | None
) -> None:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "spec": dataclasses.asdict(spec),
        "site_of": site_of,
        "complete": counts is not None,
        "patches": counts[0] if counts else None,
        "positives": counts[1] if counts else None,
    }
    atomic_write(out / MANIFEST, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def write_patient(out: Path, spec: SynthSpec, index: int) -> tuple[int, int]:
    """Render and save the patches of patient ``index``; return (patches, positives)."""
    # A generator per patient, not per run, is what keeps `workers` out of the bytes.
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0, index]))
    images, labels, xy = render_patient(rng, spec, index)
    pid = patient_id(index)
    for label in (0, 1):
        (out / pid / str(label)).mkdir(parents=True, exist_ok=True)
    for img, label, (x, y) in zip(images, labels.tolist(), xy.tolist(), strict=True):
        name = f"{pid}_idx5_x{x}_y{y}_class{label}.png"
        (out / pid / str(label) / name).write_bytes(encode_png(img))
    return len(labels), int(labels.sum())


def encode_png(img: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as PNG with fixed options and no metadata chunks."""
    buf = io.BytesIO()
    # Level 1: level 6 makes these tiny files only ~7% smaller but takes ~1.7x as long.
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
