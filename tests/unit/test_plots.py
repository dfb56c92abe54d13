"""Curves made for people: training and evaluation apart, titled, labelled, integer rounds."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from common.plots import (
    CHANCE_LABEL,
    EPOCH_PANELS,
    ROUND_PANELS,
    curves_figure,
    plot_round_curves,
    round_rows,
)
from common.protocol import EvalMetrics, RoundRow, TrainMetrics


def _row(k: int) -> dict:
    train = TrainMetrics(
        num_examples=10,
        train_loss=0.7 - 0.1 * k,
        train_accuracy=0.6,
        val_loss=0.6,
        val_accuracy=0.7,
        val_balanced_accuracy=0.5,
    ).to_record()
    evaluate = EvalMetrics(
        num_examples=5, loss=0.65, accuracy=0.72, balanced_accuracy=0.5, f1=0.0, auc=0.6
    ).to_record()
    return RoundRow(round=k, train=train, evaluate=evaluate).to_row()  # a rounds.jsonl line


@pytest.fixture
def figure():
    fig = curves_figure(round_rows([_row(1), _row(2), _row(3)]), "round", ROUND_PANELS, "run r1")
    yield fig
    plt.close(fig)


def test_every_series_key_is_a_metric_the_protocol_writes() -> None:
    train = set(
        TrainMetrics(
            num_examples=1,
            train_loss=0,
            train_accuracy=0,
            val_loss=0,
            val_accuracy=0,
            val_balanced_accuracy=0,
        ).to_record()
    )
    evaluate = set(EvalMetrics(1, 0, 0, 0, 0, 0).to_record())
    for row in ROUND_PANELS:
        for panel in row:
            for key, _ in panel.series:
                part, name = key.split("/")
                assert name in (train if part == "train" else evaluate), key


def test_training_and_evaluation_are_separate_titled_panels(figure) -> None:
    axes = figure.axes
    assert len(axes) == 4 and figure._suptitle.get_text() == "run r1"
    titles = [ax.get_title() for ax in axes]
    assert [t.split(":")[0] for t in titles] == ["training", "training", "evaluation", "evaluation"]
    for ax in axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert ax.get_xlabel() == "round" and ax.get_ylabel()
        assert all("-" not in lab or lab == CHANCE_LABEL for lab in labels), labels  # no raw keys
        assert ax.get_legend() is not None
    evaluation = [line.get_label() for line in axes[3].get_lines()]
    assert "balanced accuracy" in evaluation and "accuracy, training patches" not in evaluation


def test_rounds_are_integer_ticks_and_chance_is_drawn(figure) -> None:
    for ax in figure.axes:
        assert list(ax.get_xticks()) == [1, 2, 3]
    scores = figure.axes[3]
    assert scores.get_ylim() == pytest.approx((-0.02, 1.02))
    (chance,) = [ln for ln in scores.get_lines() if ln.get_label() == CHANCE_LABEL]
    assert set(chance.get_ydata()) == {0.5}


def test_a_single_round_still_gets_its_integer_tick() -> None:
    fig = curves_figure(round_rows([_row(1)]), "round", ROUND_PANELS)
    try:
        assert all(list(ax.get_xticks()) == [1] for ax in fig.axes)
    finally:
        plt.close(fig)


def test_epoch_curves_show_validation_balanced_accuracy_against_chance() -> None:
    rows = [
        {
            "epoch": float(e),  # common.training writes epochs as floats
            "train_loss": 1.0,
            "val_loss": 1.0,
            "train_accuracy": 0.7,
            "val_accuracy": 0.7,
            "val_balanced_accuracy": 0.5,
        }
        for e in (1, 2)
    ]
    fig = curves_figure(rows, "epoch", EPOCH_PANELS)
    try:
        loss, scores = fig.axes
        assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "epoch"]
        assert list(scores.get_xticks()) == [1, 2]
        labels = [ln.get_label() for ln in scores.get_lines()]
        assert labels == [
            "accuracy, training",
            "accuracy, validation",
            "balanced accuracy, validation",
            CHANCE_LABEL,
        ]
        assert [ln.get_label() for ln in loss.get_lines()] == ["training", "validation"]
    finally:
        plt.close(fig)


def test_plot_round_curves_writes_a_png(tmp_path) -> None:
    path = plot_round_curves([_row(1), _row(2)], tmp_path / "curves.png", "run r1")
    assert path.read_bytes()[:4] == b"\x89PNG"
