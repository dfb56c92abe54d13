"""Real patches from ../shared/data/idc-real (path from IDC_REAL_DATA)."""

import numpy as np
import pytest
import torch

from client.cli import main as client_main
from common.data import load_patches
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.partition import split_by_patient
from common.training import TrainConfig, evaluate, train

pytestmark = pytest.mark.realdata


def test_preflight_counts(real_data, tmp_path, capsys):
    assert (
        client_main(["--cache-dir", str(tmp_path / "cache"), "check", "--data", str(real_data)])
        == 0
    )
    out = capsys.readouterr().out
    assert "usable patches: 17061 from 239 patients (10647 negative, 6414 positive)" in out


def test_short_patient_split_training_beats_chance(real_data, tmp_path):
    ps = load_patches(real_data, cache_dir=tmp_path / "cache", workers=2)
    split = split_by_patient(ps.patients, (0.7, 0.0, 0.3), seed=0)
    assert not set(ps.patients[split.train]) & set(ps.patients[split.test])
    rng = np.random.default_rng(0)
    train_idx = rng.choice(split.train, 1500, replace=False)
    test_idx = rng.choice(split.test, 1000, replace=False)
    # group norm: a run this short leaves batch norm's running statistics unsettled, and
    # what is measured here is the data and the loop, not how fast those statistics settle
    model = build_model("group", seed=0)
    loader = make_loader(PatchDataset(ps.images, ps.labels, train_idx, augment=True), 64, True)
    train(model, loader, TrainConfig(epochs=2, lr=1e-3, patience=None))
    m = evaluate(
        model,
        make_loader(PatchDataset(ps.images, ps.labels, test_idx), 256, False),
        torch.device("cpu"),
    )
    assert m.balanced_accuracy > 0.6, m
