"""Real patches from ../shared/data/idc-real (path from IDC_REAL_DATA)."""

import numpy as np
import pytest
import torch

from client.cli import main as client_main
from common.data import load_patches
from common.dataset import PatchDataset, make_loader
from common.metrics import score
from common.model import build_model
from common.partition import split_by_patient
from common.training import TrainConfig, predict, train

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
    split = split_by_patient(ps.patients, ps.labels, (0.6, 0.1, 0.3), seed=0)
    assert not set(ps.patients[split.train]) & set(ps.patients[split.test])
    assert not set(ps.patients[split.val]) & set(ps.patients[split.test])
    rng = np.random.default_rng(0)
    train_idx = rng.choice(split.train, 1500, replace=False)
    val_idx = rng.choice(split.val, min(600, len(split.val)), replace=False)
    test_idx = rng.choice(split.test, 1000, replace=False)
    torch.manual_seed(0)
    # group norm: a run this short leaves batch norm's running statistics unsettled, and
    # what is measured here is the data and the loop, not how fast those statistics settle
    model = build_model("group", seed=0)
    loader = make_loader(PatchDataset(ps.images, ps.labels, train_idx, augment=True), 64, True)
    train(model, loader, TrainConfig(epochs=2, lr=1e-3, patience=None))
    cpu = torch.device("cpu")

    def probs(idx):
        labels, p, _ = predict(
            model, make_loader(PatchDataset(ps.images, ps.labels, idx), 256, False), cpu
        )
        return labels, p

    # two epochs leave P(IDC) nearly constant (seen: every patch within 0.396-0.400) while
    # ranking the patches well: at 0.5 a run may call every patch negative, and so may the
    # product's 50-bin validation histogram. The threshold that maximises balanced accuracy
    # on the validation patients' own probabilities is chosen, and the test patients are
    # scored once at it (model seeds 0-3, 1 thread: BAC 0.75-0.80, AUC 0.83-0.89).
    val_labels, val_p = probs(val_idx)
    candidates = np.unique(val_p)
    threshold = max(candidates, key=lambda t: score(val_labels, val_p, 0.0, t).balanced_accuracy)
    labels, p = probs(test_idx)
    m = score(labels, p, 0.0, threshold=float(threshold))
    assert m.auc > 0.75, m
    assert m.balanced_accuracy > 0.65, (threshold, m)
