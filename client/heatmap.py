"""Per-patient slide views: patches laid back at their (x, y) places, IDC probability, true IDC.

A patch's name gives the pixel position of its top-left corner on the slide. Positions are
not always multiples of 50 (real values run 1001, 1051, ...), so a patch's grid cell is
``round((x - min_x) / 50)`` along x and likewise along y; ``origin`` is ``(min_x, min_y)``.
Grids are indexed ``[row, column]`` = ``[y cell, x cell]`` like an image. Two patches that
round to the same cell keep the higher probability (an IDC call is never hidden by a
neighbour) and the last-written pixels.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.data import PATCH, UNLABELLED, PatchSet  # noqa: E402

BACKGROUND = 255  # white: no tissue patch at this place
MAX_PANEL_INCHES = 8.0  # big slides shrink to this; small ones grow to the minimum
MIN_PANEL_INCHES = 3.0


def grid_cells(
    xs: np.ndarray, ys: np.ndarray, patch: int = PATCH
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Return (row index, column index, origin) of each patch on its patient's grid.

    Raises
    ------
    ValueError
        If ``xs`` and ``ys`` differ in length, are empty, or ``patch`` is not positive.
    """
    xs, ys = np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)
    if xs.shape != ys.shape or xs.ndim != 1 or len(xs) == 0:
        raise ValueError(f"need matching non-empty 1-D xs and ys, got {xs.shape} and {ys.shape}")
    if patch < 1:
        raise ValueError(f"patch size must be >= 1, got {patch}")
    origin = (int(xs.min()), int(ys.min()))
    cols = np.rint((xs - origin[0]) / patch).astype(np.int64)
    rows = np.rint((ys - origin[1]) / patch).astype(np.int64)
    return rows, cols, origin


def probability_grid(
    xs: np.ndarray, ys: np.ndarray, values: np.ndarray, patch: int = PATCH
) -> tuple[np.ndarray, tuple[int, int]]:
    """Place one value per patch on a (rows, cols) float grid; NaN where there is no patch."""
    values = np.asarray(values, dtype=np.float64)
    rows, cols, origin = grid_cells(xs, ys, patch)
    if values.shape != rows.shape:
        raise ValueError(f"{len(values)} values for {len(rows)} patch positions")
    grid = np.full((rows.max() + 1, cols.max() + 1), np.nan)
    np.fmax.at(grid, (rows, cols), values)  # fmax ignores the NaN fill: max over duplicates
    return grid, origin


def mosaic(
    images: np.ndarray, xs: np.ndarray, ys: np.ndarray, cell: int = 10, patch: int = PATCH
) -> np.ndarray:
    """Lay (N, 50, 50, 3) uint8 patches at their places, each shrunk to ``cell`` pixels.

    ``cell`` must divide the patch size (50: full resolution; 10: a fifth, by block mean),
    so the result is ``(rows * cell, cols * cell, 3)`` uint8 with white where no patch is.
    """
    if cell < 1 or patch % cell:
        raise ValueError(f"cell must divide the patch size {patch}, got {cell}")
    rows, cols, _ = grid_cells(xs, ys, patch)
    images = np.asarray(images)
    if images.shape[1:] != (patch, patch, 3) or len(images) != len(rows):
        raise ValueError(f"images of shape {images.shape} do not match {len(rows)} positions")
    k = patch // cell
    small = images.reshape(len(images), cell, k, cell, k, 3).mean(axis=(2, 4), dtype=np.float32)
    out = np.full((rows.max() + 1, cols.max() + 1, cell, cell, 3), BACKGROUND, dtype=np.uint8)
    out[rows, cols] = np.rint(small).astype(np.uint8)
    return out.transpose(0, 2, 1, 3, 4).reshape(out.shape[0] * cell, out.shape[1] * cell, 3)


def region_edges(mask: np.ndarray) -> np.ndarray:
    """Outline of the True cells of a 2-D mask as segments (S, 2, 2) of (x, y) cell corners.

    Cell ``[r, c]`` spans x in [c, c+1] and y in [r, r+1]; a side is drawn where the cell
    meets a False cell or the border, so the outline follows patch edges exactly.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1]
    segs = []
    for dr, dc, a, b in (
        (-1, 0, (0, 0), (1, 0)),
        (1, 0, (0, 1), (1, 1)),
        (0, -1, (0, 0), (0, 1)),
        (0, 1, (1, 0), (1, 1)),
    ):
        # a side (start corner a, end corner b as (dx, dy)) faces neighbour (dr, dc)
        neighbour = m[1 + dr : m.shape[0] - 1 + dr, 1 + dc : m.shape[1] - 1 + dc]
        r, c = np.nonzero(inner & ~neighbour)
        start = np.stack([c + a[0], r + a[1]], axis=1)
        end = np.stack([c + b[0], r + b[1]], axis=1)
        segs.append(np.stack([start, end], axis=1))
    return np.concatenate(segs).astype(np.float64)


def _outline(ax: plt.Axes, labels_grid: np.ndarray | None) -> None:
    if labels_grid is None:
        return
    segs = region_edges(np.nan_to_num(labels_grid) > 0.5)
    if len(segs):
        ax.add_collection(LineCollection(list(segs), colors="cyan", linewidths=1.2))


def plot_patient(
    patient: str,
    images: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    probs: np.ndarray,
    path: Path,
    labels: np.ndarray | None = None,
    cell: int = 10,
    *,
    threshold: float = 0.5,
    caption: str = "",
) -> Path:
    """Tissue mosaic beside the IDC probability map, true IDC outlined when labels are given.

    The title gives the share of patches called IDC at ``threshold`` (marked on the colour
    bar); ``caption`` (the model and its run) is printed under it, so a figure shown on its
    own still says what made it.
    """
    grid, origin = probability_grid(xs, ys, probs)
    truth = probability_grid(xs, ys, labels)[0] if labels is not None else None
    tissue = mosaic(images, xs, ys, cell)
    rows, cols = grid.shape
    extent = (0.0, float(cols), float(rows), 0.0)  # one unit per patch, y down like the slide
    scale = min(MAX_PANEL_INCHES / max(cols, rows), 0.25)  # inches per patch
    width, height = max(cols * scale, MIN_PANEL_INCHES), max(rows * scale, MIN_PANEL_INCHES)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width + 2.0, height + 1.6), squeeze=False)
    ax_t, ax_p = axes[0]
    ax_t.imshow(tissue, extent=extent, interpolation="nearest")
    ax_t.set_title("tissue")
    cmap = plt.get_cmap("inferno").with_extremes(bad="lightgrey")
    shown = ax_p.imshow(
        np.ma.masked_invalid(grid),
        extent=extent,
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    ax_p.set_title("predicted P(IDC); grey: no patch")
    label = f"probability of IDC (green: threshold {threshold:g})"
    bar = fig.colorbar(shown, ax=ax_p, fraction=0.046, pad=0.04, label=label)
    bar.ax.axhline(threshold, color="lime", linewidth=2)
    for ax in (ax_t, ax_p):
        _outline(ax, truth)
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_xlabel(f"x, patches of {PATCH} px from {origin[0]}")
        ax.set_ylabel(f"y, patches from {origin[1]}")
    called = int((np.asarray(probs) >= threshold).sum())
    title = (
        f"patient {patient}: {called} of {len(probs)} patches predicted IDC "
        f"({100 * called / len(probs):.1f}%, P(IDC) >= {threshold:g})"
    )
    if truth is not None:
        title += "; cyan outline: true IDC"
    fig.suptitle(f"{title}\n{caption}".strip(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_heatmaps(
    out: Path, patches: PatchSet, probs: np.ndarray, cell: int, threshold: float, caption: str
) -> int:
    """One PNG per patient under ``out``; returns how many were written."""
    out.mkdir(parents=True, exist_ok=True)
    patients = sorted(set(patches.patients.tolist()))
    for patient in tqdm(patients, desc="heatmaps", unit="patient", disable=None, leave=False):
        idx = np.flatnonzero(patches.patients == patient)
        labels = patches.labels[idx]
        plot_patient(
            patient,
            patches.images[idx],
            patches.xs[idx],
            patches.ys[idx],
            probs[idx],
            out / f"{patient}.png",
            None if (labels == UNLABELLED).any() else labels,  # outline only a full truth
            cell,
            threshold=threshold,
            caption=caption,
        )
    return len(patients)
