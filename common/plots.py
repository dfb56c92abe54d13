"""The paper's figures as PNG: learning curves, confusion matrices, example patches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

CLASS_NAMES = ("IDC(-)", "IDC(+)")
CHANCE = 0.5  # balanced accuracy and AUC of a model that cannot tell the classes apart
CHANCE_LABEL = "chance: balanced accuracy, AUC"
MAX_LABELLED_TICKS = 12  # up to this many rounds or epochs, each gets its tick


@dataclass(frozen=True)
class Panel:
    """One axes of a curves figure: a title, a y label, and (row key, legend label) series.

    ``scores`` marks a panel of scores in [0, 1]: its y axis is fixed to that range, so small
    wiggles do not look like learning. ``chance`` adds a dashed line at 0.5 for panels with
    balanced accuracy or AUC: a model that calls every patch negative sits on it.
    """

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    scores: bool = False
    chance: bool = False


# The centralized baseline's history rows (Figure 1 of the paper): train and validation.
EPOCH_PANELS = (
    (
        Panel("loss", "cross-entropy", (("train_loss", "training"), ("val_loss", "validation"))),
        Panel(
            "scores",
            "score",
            (
                ("train_accuracy", "accuracy, training"),
                ("val_accuracy", "accuracy, validation"),
                ("val_balanced_accuracy", "balanced accuracy, validation"),
            ),
            scores=True,
            chance=True,
        ),
    ),
)


def _wire(field: str) -> str:
    """A metric's key in rounds.jsonl (common.protocol writes field names with dashes)."""
    return field.replace("_", "-")


# A federated run's rounds.jsonl: the "train" part is what the sites measured while training
# locally (weighted mean), the "evaluate" part is the global model on the sites' test patients.
ROUND_PANELS = (
    (
        Panel(
            "training: loss (sites' local training, weighted mean)",
            "cross-entropy",
            (
                ("train/" + _wire("train_loss"), "training patches"),
                ("train/" + _wire("val_loss"), "validation patches"),
            ),
        ),
        Panel(
            "training: scores (sites' local training, weighted mean)",
            "score",
            (
                ("train/" + _wire("train_accuracy"), "accuracy, training patches"),
                ("train/" + _wire("val_accuracy"), "accuracy, validation patches"),
                ("train/" + _wire("val_balanced_accuracy"), "balanced accuracy, validation"),
            ),
            scores=True,
            chance=True,
        ),
    ),
    (
        Panel(
            "evaluation: loss (global model, sites' test patients)",
            "cross-entropy",
            (("evaluate/loss", "test patches"),),
        ),
        Panel(
            "evaluation: scores (global model, sites' test patients)",
            "score",
            (
                ("evaluate/" + _wire("balanced_accuracy"), "balanced accuracy"),
                ("evaluate/accuracy", "accuracy"),
                ("evaluate/f1", "F1 (IDC)"),
                ("evaluate/auc", "ROC AUC"),
            ),
            scores=True,
            chance=True,
        ),
    ),
)


def _draw(ax: Any, rows: Sequence[Mapping[str, Any]], x: str, panel: Panel) -> None:
    xs = [r[x] for r in rows]
    drawn = 0
    for key, label in panel.series:
        ys = [r.get(key) for r in rows]
        if any(v is not None for v in ys):
            ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=label)
            drawn += 1
    if panel.chance:
        ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label=CHANCE_LABEL)
    if panel.scores:
        ax.set_ylim(-0.02, 1.02)
    if not drawn:
        ax.text(0.5, 0.5, "not reported", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(x)
    ax.set_ylabel(panel.ylabel)
    # Rounds and epochs are counts: integer ticks only, even for a single round.
    if 0 < len(set(xs)) <= MAX_LABELLED_TICKS:
        ax.set_xticks(sorted(set(xs)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best")


def curves_figure(
    rows: Sequence[Mapping[str, Any]],
    x: str = "epoch",
    panels: Sequence[Sequence[Panel]] = EPOCH_PANELS,
    title: str = "",
) -> Figure:
    """A grid of panels (one grid row per inner sequence), each series plotted against ``x``."""
    n_rows, n_cols = len(panels), max(len(row) for row in panels)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(6 * n_cols, 3.8 * n_rows + 0.6), squeeze=False
    )
    for r, row in enumerate(panels):
        for c in range(n_cols):
            if c < len(row):
                _draw(axes[r][c], rows, x, row[c])
            else:
                axes[r][c].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    x: str = "epoch",
    panels: Sequence[Sequence[Panel]] = EPOCH_PANELS,
    title: str = "",
) -> Path:
    """Write :func:`curves_figure` to ``path`` as PNG."""
    fig = curves_figure(rows, x, panels, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def round_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """rounds.jsonl rows flattened for :data:`ROUND_PANELS`: ``train/<key>``, ``evaluate/<key>``."""
    return [
        {
            "round": int(r["round"]),
            **{f"train/{k}": v for k, v in (r.get("train") or {}).items()},
            **{f"evaluate/{k}": v for k, v in (r.get("evaluate") or {}).items()},
        }
        for r in rows
    ]


def plot_round_curves(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """A federated run's curves from its rounds.jsonl rows: training and evaluation apart."""
    return plot_curves(round_rows(rows), path, x="round", panels=ROUND_PANELS, title=title)


def plot_confusion(confusion: Sequence[Sequence[int]], path: Path, title: str = "") -> Path:
    """Confusion matrix as counts and as row percentages, side by side (Figure 2)."""
    cm = np.asarray(confusion, dtype=np.float64)
    pct = 100 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, data, fmt, name in (
        (axes[0], cm, "{:.0f}", "counts"),
        (axes[1], pct, "{:.1f}%", "percent of true class"),
    ):
        ax.imshow(data, cmap="Blues", vmin=0.0)
        for i in range(2):
            for j in range(2):
                # dark cells (above half the colour scale) get white text
                colour = "white" if data[i, j] > max(data.max(), 1e-9) / 2 else "black"
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color=colour)
        ax.set_xticks([0, 1], CLASS_NAMES)
        ax.set_yticks([0, 1], CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    if title:
        fig.suptitle(title, fontsize=10)
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
