"""The paper's figures as PNG: learning curves, confusion matrices, example patches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CLASS_NAMES = ("IDC(-)", "IDC(+)")


def plot_curves(
    rows: Sequence[Mapping[str, float]],
    path: Path,
    x: str = "epoch",
    pairs: Sequence[tuple[str, str]] = (
        ("train_accuracy", "val_accuracy"),
        ("train_loss", "val_loss"),
    ),
) -> Path:
    """Plot one panel per pair of series against ``x`` (Figure 1 of the paper)."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.6), squeeze=False)
    xs = [r[x] for r in rows]
    for ax, pair in zip(axes[0], pairs, strict=True):
        for key in pair:
            ys = [r.get(key) for r in rows]
            if any(v is not None for v in ys):
                ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=key)
        ax.set_xlabel(x)
        ax.set_title(pair[0].split("_", 1)[-1])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], path: Path, title: str = "") -> Path:
    """Confusion matrix as counts and as row percentages, side by side (Figure 2)."""
    cm = np.asarray(confusion, dtype=np.float64)
    pct = 100 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, data, fmt, name in (
        (axes[0], cm, "{:.0f}", "counts"),
        (axes[1], pct, "{:.1f}%", "percent of true class"),
    ):
        ax.imshow(data, cmap="Blues")
        for i in range(2):
            for j in range(2):
                colour = "white" if data[i, j] > data.max() / 2 else "black"
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color=colour)
        ax.set_xticks([0, 1], CLASS_NAMES)
        ax.set_yticks([0, 1], CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} {name}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_examples(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path, per_row: int = 8
) -> Path:
    """Rows of correctly and wrongly classified patches with their labels (Figure 3)."""
    pred = (np.asarray(probs) >= 0.5).astype(int)
    groups = (
        ("correct", np.flatnonzero(pred == labels)[:per_row]),
        ("wrong", np.flatnonzero(pred != labels)[:per_row]),
    )
    fig, axes = plt.subplots(2, per_row, figsize=(1.6 * per_row, 4), squeeze=False)
    for row, (name, idx) in enumerate(groups):
        for col in range(per_row):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(idx):
                k = idx[col]
                ax.imshow(np.asarray(images[k]))
                ax.set_title(f"{name}\npred {pred[k]} true {labels[k]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
