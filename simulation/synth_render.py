"""How a synthetic patient's patches look: H&E-like stain, nuclei, fat and a compact tumour.

The image model behind :mod:`simulation.synth` (which writes the patches to disk): pure
functions of a seeded generator and a :class:`Spec` (a :class:`~simulation.synth.SynthSpec`
is one; this module does not import it, so the two never import each other).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Protocol

import numpy as np


class Spec(Protocol):
    """What rendering reads of a :class:`~simulation.synth.SynthSpec`."""

    @property
    def seed(self) -> int:
        """The run seed."""

    @property
    def sites(self) -> int:
        """How many sites the patients are dealt to."""

    @property
    def site_shift(self) -> float:
        """How far each site's stain drifts."""

    @property
    def patches_per_patient(self) -> tuple[int, int]:
        """Fewest and most patches a patient."""

    @property
    def positive_fraction(self) -> tuple[float, float]:
        """Range of a patient's IDC share."""


PATCH = 50

# Optical-density directions (Ruifrok & Johnston): haematoxylin purple, eosin pink.
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.93, 0.36])
_STAMP = np.arange(-5, 6)  # 11-pixel window: the largest nucleus (radius 4.8) fits inside


def render_patient(
    rng: np.random.Generator, spec: Spec, index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return a patient's (P, 50, 50, 3) uint8 images, (P,) labels and (P, 2) slide x, y."""
    lo, hi = spec.patches_per_patient
    n = int(rng.integers(lo, hi + 1))
    labels, xy = _layout(rng, n, round(rng.uniform(*spec.positive_fraction) * n))
    m = _malignancy(rng, labels)
    stain = _stain(rng, spec, index)
    nuclei = _nuclei(rng, m, size_scale=float(np.exp(rng.normal(0.0, 0.08))))
    return _compose(rng, m, nuclei, _fat(rng, m), stain), labels, xy


def _layout(rng: np.random.Generator, n: int, positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Place n patches on a slide grid; the tumour is the compact region around one cell."""
    cols = math.ceil(math.sqrt(n * 1.6))
    cells = rng.permutation(cols * math.ceil(n * 1.6 / cols))[:n]
    r, c = np.divmod(cells, cols)
    centre = rng.integers(n)
    dist = np.hypot(r - r[centre], c - c[centre]) + rng.uniform(0.0, 1.5, n)  # ragged edge
    labels = np.zeros(n, dtype=np.int64)
    labels[np.argsort(dist, kind="stable")[:positives]] = 1
    return labels, np.stack([c * PATCH, r * PATCH], axis=1)


def _malignancy(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Per-patch score in [0, 1] that drives every visual cue; the classes overlap on purpose."""
    n = len(labels)
    # Spreads tuned so that the paper's CNN, trained on 120 patients, scores about 88-90% on
    # held-out patients (not 100%): per-patient offset, per-patch spread, and a few patches
    # drawn from the other class's range (benign ducts or lymphocyte clusters that look dense,
    # sparse tumour margins).
    m = np.where(labels == 1, 0.70, 0.30) + rng.normal(0.0, 0.06) + rng.normal(0.0, 0.08, n)
    odd = rng.random(n) < 0.04
    m = np.where(odd & (labels == 0), rng.uniform(0.45, 0.85, n), m)
    m = np.where(odd & (labels == 1), rng.uniform(0.15, 0.55, n), m)
    return np.clip(m, 0.0, 1.0)


class _Stain(NamedTuple):
    h: np.ndarray  # unit optical-density direction of haematoxylin, float32 (3,)
    e: np.ndarray  # the same for eosin
    gain_h: float
    gain_e: float
    light: float  # brightness of bare glass


def _stain(rng: np.random.Generator, spec: Spec, index: int) -> _Stain:
    """Per-patient stain: jittered H/E directions and strengths, plus its site's profile."""
    h = _H_OD + rng.normal(0.0, 0.04, 3)
    e = _E_OD + rng.normal(0.0, 0.04, 3)
    gains = np.exp(rng.normal(0.0, 0.12, 2))
    light = rng.uniform(232.0, 250.0)
    if spec.sites > 1 and spec.site_shift > 0:
        # Seeded by the site alone, so all patients of a site share one shift.
        site = np.random.default_rng(np.random.SeedSequence([spec.seed, 1, index % spec.sites]))
        s = spec.site_shift
        h = h + s * 0.25 * _unit(site.normal(size=3))
        e = e + s * 0.25 * _unit(site.normal(size=3))
        gains = gains * np.exp(s * site.normal(0.0, 0.25, 2))
        light = float(np.clip(light - s * site.uniform(-12.0, 12.0), 200.0, 255.0))
    h32, e32 = (_unit(np.clip(v, 0.02, None)).astype(np.float32) for v in (h, e))
    return _Stain(h32, e32, float(gains[0]), float(gains[1]), float(light))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@functools.lru_cache(maxsize=8)
def _smooth_basis(k: int) -> np.ndarray:
    """(50, k) Gaussian interpolation weights that turn a k x k grid into a smooth 50 x 50 map."""
    x = np.arange(PATCH) + 0.5
    centres = np.linspace(-PATCH / (2 * k), PATCH + PATCH / (2 * k), k)
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / (PATCH / k)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, p: int, k: int) -> np.ndarray:
    """(p, 50, 50) zero-mean, unit-variance noise with blobs about 50/k pixels wide."""
    b = _smooth_basis(k)
    field = b @ rng.standard_normal((p, k, k), dtype=np.float32) @ b.T
    return field / (field.std(axis=(1, 2), keepdims=True) + 1e-6)


def _columns(*values: np.ndarray) -> list[np.ndarray]:
    """Per-object values as float32 (n, 1, 1) arrays, to broadcast over each object's pixels."""
    return [np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in values]


def _nuclei(rng: np.random.Generator, m: np.ndarray, size_scale: float) -> np.ndarray:
    """(P, 50, 50) haematoxylin density of soft, possibly ragged elliptical nuclei."""
    p = len(m)
    idx = np.repeat(np.arange(p), np.minimum(rng.poisson(4.0 + 34.0 * m), 70))
    n, mn = len(idx), m[idx]
    cx, cy = rng.uniform(-2.0, 52.0, (2, n))
    # Tumour nuclei: larger, more varied in size, more eccentric and ragged, darker.
    a = np.clip((1.4 + 2.2 * mn) * size_scale * np.exp(rng.normal(0.0, 0.12 + 0.22 * mn)), 0.8, 4.8)
    b = a * (1.0 - rng.uniform(0.0, 0.25 + 0.35 * mn))
    theta = rng.uniform(0.0, np.pi, n)
    ragged = rng.uniform(0.0, 0.05 + 0.25 * mn) * np.array([[0.6], [0.4]])
    phase = rng.uniform(0.0, 2 * np.pi, (2, n))
    darkness = (0.75 + 0.6 * mn) * rng.uniform(0.8, 1.2, n)
    # Per-pixel work stays in float32 on an 11 x 11 stamp per nucleus, never a full patch.
    cos, sin, inv_a, inv_b, edge, dark, c2, c3, s2, s3 = _columns(
        np.cos(theta),
        np.sin(theta),
        1 / a,
        1 / b,
        1.4 * a,
        darkness,
        *(ragged * np.cos(phase)),
        *(ragged * np.sin(phase)),
    )
    ix, iy = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
    dx = (ix[:, None] + _STAMP - cx[:, None]).astype(np.float32)[:, None, :]
    dy = (iy[:, None] + _STAMP - cy[:, None]).astype(np.float32)[:, :, None]
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    r = np.sqrt(u * u + v * v) + np.float32(1e-6)
    c, s = u / r, v / r
    # sin(k*phi + phase) expanded in cos(phi), sin(phi): no arctan2 or sin per pixel.
    wobble = (
        1.0
        + c2 * (2 * s * c)
        + s2 * (c * c - s * s)
        + c3 * (3 * s - 4 * s * s * s)
        + s3 * (4 * c * c * c - 3 * c)
    )
    d = np.sqrt((u * inv_a) ** 2 + (v * inv_b) ** 2) / wobble
    # A linear ramp about 0.7 px wide makes the soft edge without an exp per pixel.
    inside = np.clip((1.0 - d) * edge + 0.5, 0.0, 1.0)
    weight = inside * dark * (0.7 + 0.45 * rng.random(inside.shape, dtype=np.float32))
    rows, cols = (iy[:, None] + _STAMP)[:, :, None], (ix[:, None] + _STAMP)[:, None, :]
    # Stamp pixels off the patch add zero weight to a clipped, valid index.
    weight *= (rows >= 0) & (rows < PATCH) & (cols >= 0) & (cols < PATCH)
    flat = (idx[:, None, None] * PATCH + rows.clip(0, PATCH - 1)) * PATCH + cols.clip(0, PATCH - 1)
    canvas = np.bincount(flat.ravel(), weights=weight.ravel(), minlength=p * PATCH**2)
    return canvas.reshape(p, PATCH, PATCH).astype(np.float32)


def _fat(rng: np.random.Generator, m: np.ndarray) -> np.ndarray:
    """(P, 50, 50) in [0, 1]: round-ish near-white fat cells and lumens, fewer in tumour."""
    p = len(m)
    idx = np.repeat(np.arange(p), np.minimum(rng.poisson(0.2 + 2.4 * (1.0 - m) ** 2), 4))
    shape = rng.uniform((-8.0, -8.0, 3.0, 0.65), (58.0, 58.0, 13.0, 1.0), (len(idx), 4))
    cx, cy, r, aspect = _columns(*shape.T)
    grid = np.arange(PATCH, dtype=np.float32) + 0.5
    d = np.sqrt(
        ((grid[None, None, :] - cx) / r) ** 2 + ((grid[None, :, None] - cy) / (r * aspect)) ** 2
    )
    d -= 0.12 * _smooth_noise(rng, len(idx), 6)  # ragged outline
    mask = np.clip((1.0 - d) * r * 0.8 + 0.5, 0.0, 1.0)
    flat = idx[:, None] * PATCH**2 + np.arange(PATCH**2)
    total = np.bincount(flat.ravel(), weights=mask.ravel(), minlength=p * PATCH**2)
    return np.minimum(total, 1.0).reshape(p, PATCH, PATCH).astype(np.float32)


def _compose(
    rng: np.random.Generator, m: np.ndarray, nuclei: np.ndarray, fat: np.ndarray, stain: _Stain
) -> np.ndarray:
    """Mix the stain densities into RGB by Beer-Lambert, then add mild pixel noise."""
    p = len(m)
    m3 = m[:, None, None].astype(np.float32)
    texture = 0.6 * _smooth_noise(rng, p, 4) + 0.4 * _smooth_noise(rng, p, 12)
    nuc = 1.0 - np.exp(-1.5 * nuclei)  # overlapping nuclei saturate rather than go black
    # Tumour replaces pink stroma with pale, slightly purple cytoplasm.
    eosin = (0.65 - 0.30 * m3) * (1.0 + 0.22 * texture) * (1.0 - 0.7 * nuc)
    haem = 1.5 * nuc + (0.04 + 0.16 * m3) * (1.0 + 0.3 * texture)
    # Uniform rather than Gaussian grain: a third of the cost, and the eye cannot tell.
    grain = (1.0 - fat) * (0.9 + 0.2 * rng.random((p, PATCH, PATCH), dtype=np.float32))
    conc_h = np.float32(stain.gain_h) * np.maximum(haem * grain, 0.0)
    conc_e = np.float32(stain.gain_e) * np.maximum(eosin * grain, 0.0) + np.float32(0.03)
    od = conc_h[..., None] * stain.h + conc_e[..., None] * stain.e
    rgb = np.exp(-od, out=od)
    rgb *= np.float32(stain.light)
    # Raw random bytes are the cheapest noise: uniform on -3.5..3.5 in steps of 1, plus 0.5
    # so that the truncating cast rounds.
    noise = np.frombuffer(rng.bytes(rgb.size), dtype=np.uint8).reshape(rgb.shape) & 7
    rgb += noise - np.float32(3.0)
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)
