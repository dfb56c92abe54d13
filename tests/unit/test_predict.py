from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from client.cli import main
from client.heatmap import grid_cells, mosaic, plot_patient, probability_grid, region_edges
from client.predict import infer, load_network, run_predict
from client.predict_report import best_threshold, model_caption
from common.metrics import score
from common.model import build_model
from common.provenance import save_model
from common.site_data import model_arrays
from tests.conftest import write_patch

# Patient 10 sits at real-style offsets (1001, 1051, ...): cells (row, col) = (0,0), (0,2),
# (1,1), (2,2); patient 11 has one patch. The odd-size patch is padded, the junk one skipped.
P10 = [(1001, 2001, 0), (1101, 2001, 1), (1051, 2051, 0), (1101, 2101, 1)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for x, y, label in P10:
        write_patch(root, "10", x, y, label)
    write_patch(root, "11", 0, 0, 0)
    write_patch(root, "11", 50, 0, 1, size=(50, 31))  # slide border: shorter patch
    junk = root / "11" / "1" / "11_idx5_x100_y0_class1.png"
    junk.write_bytes(b"\x89PNG this is not an image")
    return root


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    arrays = model_arrays(build_model("batch", seed=0))
    return save_model(tmp_path / "model.idc", arrays, {"run_id": "test-run", "rounds": 0})


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_writes_rows_metrics_and_heatmaps(tmp_path, folder, model_file) -> None:
    model, meta = load_network(model_file)
    out = tmp_path / "out"
    summary = run_predict(model, folder, out, meta, device="cpu", batch_size=2)
    rows = _csv(out / "predictions.csv")
    files = {r["file"] for r in rows}
    assert len(rows) == 6 and "11/1/11_idx5_x50_y0_class1.png" in files  # odd size kept
    assert "11/1/11_idx5_x100_y0_class1.png" not in files  # unreadable left out ...
    assert summary["data"]["report"]["unreadable"] == ["11/1/11_idx5_x100_y0_class1.png"]
    row = next(r for r in rows if r["file"].endswith("x1101_y2101_class1.png"))
    assert (row["patient"], row["x"], row["y"], row["label"]) == ("10", "1101", "2101", "1")
    assert 0.0 <= float(row["probability"]) <= 1.0
    assert int(row["predicted"]) == int(float(row["probability"]) >= 0.5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == 6 and sum(map(sum, metrics["confusion"])) == 6
    assert (out / "confusion.png").stat().st_size > 1000
    patients = {r["patient"]: r for r in _csv(out / "patients.csv")}
    assert patients["10"]["patches"] == "4" and patients["10"]["true_idc_share"] == "0.5"
    for p in ("10", "11"):
        with Image.open(out / "heatmaps" / f"{p}.png") as img:
            assert img.width > 300 and img.height > 150


def test_predictions_match_a_direct_forward_pass(tmp_path, folder, model_file) -> None:
    model, _ = load_network(model_file)
    images = np.random.default_rng(0).integers(0, 255, (5, 50, 50, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        expected = torch.softmax(model(x), 1)[:, 1].numpy()
    got = infer(model, images, torch.device("cpu"), batch_size=2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_probability_grid_places_each_patch() -> None:
    xs = np.array([x for x, _, _ in P10])
    ys = np.array([y for _, y, _ in P10])
    values = np.array([0.1, 0.2, 0.3, 0.4])
    grid, origin = probability_grid(xs, ys, values)
    assert origin == (1001, 2001) and grid.shape == (3, 3)
    assert grid[0, 0] == 0.1 and grid[0, 2] == 0.2 and grid[1, 1] == 0.3 and grid[2, 2] == 0.4
    assert np.isnan(grid).sum() == 5


def test_coordinates_off_the_50_pixel_grid_round_to_the_nearest_cell() -> None:
    rows, cols, origin = grid_cells(np.array([1001, 1052, 1099]), np.array([7, 7, 56]))
    assert origin == (1001, 7) and cols.tolist() == [0, 1, 2] and rows.tolist() == [0, 0, 1]


def test_duplicate_cells_keep_the_higher_probability() -> None:
    grid, _ = probability_grid(np.array([0, 2]), np.array([0, 0]), np.array([0.9, 0.2]))
    assert grid.shape == (1, 1) and grid[0, 0] == 0.9


def test_mosaic_puts_pixels_in_place() -> None:
    images = np.stack([np.full((50, 50, 3), v, np.uint8) for v in (10, 20, 30)])
    tissue = mosaic(images, np.array([0, 100, 50]), np.array([0, 0, 50]), cell=10)
    assert tissue.shape == (20, 30, 3)
    assert (tissue[:10, :10] == 10).all() and (tissue[:10, 20:] == 20).all()
    assert (tissue[10:, 10:20] == 30).all() and (tissue[:10, 10:20] == 255).all()
    assert mosaic(images, np.array([0, 100, 50]), np.array([0, 0, 50]), cell=50).shape == (
        100,
        150,
        3,
    )
    with pytest.raises(ValueError, match="cell"):
        mosaic(images, np.array([0, 100, 50]), np.array([0, 0, 50]), cell=7)


def test_region_edges_outline_a_single_cell_and_an_l_shape() -> None:
    one = region_edges(np.array([[False, True]]))
    assert len(one) == 4
    assert {tuple(map(tuple, s)) for s in one} >= {((1.0, 0.0), (2.0, 0.0))}  # top side
    ell = region_edges(np.array([[True, False], [True, True]]))
    assert len(ell) == 8  # perimeter of an L of three cells, in unit sides
    assert len(region_edges(np.zeros((3, 3), bool))) == 0


def test_cli_refuses_a_tampered_model(tmp_path, folder, model_file, capsys) -> None:
    raw = torch.load(model_file, weights_only=True)
    raw["state_dict"]["head.9.bias"][0] += 1.0
    torch.save(raw, model_file)
    out = tmp_path / "out"
    code = main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "predict",
            "--model",
            str(model_file),
            "--data",
            str(folder),
            "--out",
            str(out),
            "--no-heatmaps",
        ]
    )
    assert code != 0 and "refused" in capsys.readouterr().err
    assert not out.exists()


def test_cli_prints_provenance_and_unverified_needs_the_flag(tmp_path, folder, capsys) -> None:
    plain = tmp_path / "model.pt"
    torch.save(build_model("group", seed=0).state_dict(), plain)
    args = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "predict",
        "--model",
        str(plain),
        "--data",
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--no-heatmaps",
    ]
    assert main(args) != 0
    assert main([*args, "--allow-unverified"]) == 0
    captured = capsys.readouterr()
    assert "NONE (unverified" in captured.out and "WARNING" in captured.err
    assert len(_csv(tmp_path / "out" / "predictions.csv")) == 6


def _unlabelled(root: Path, patient: str, x: int, y: int, here: bool = False) -> None:
    d = root if here else root / patient
    d.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(x + 7 * y).integers(0, 255, (50, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(d / f"{patient}_idx5_x{x}_y{y}.png")


@pytest.fixture
def new_slides(tmp_path: Path) -> Path:
    root = tmp_path / "new"
    for x, y in ((1001, 2001), (1051, 2001), (1001, 2051)):
        _unlabelled(root, "20", x, y)
    _unlabelled(root, "21", 0, 0)
    return root


def _predict(tmp_path: Path, model: Path, data: Path, *extra: str) -> int:
    return main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "predict",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_unlabelled_patches_are_scored_without_metrics(tmp_path, new_slides, model_file, capsys):
    assert _predict(tmp_path, model_file, new_slides) == 0
    out = tmp_path / "out"
    rows = _csv(out / "predictions.csv")
    assert sorted(r["file"] for r in rows) == [
        "20/20_idx5_x1001_y2001.png",
        "20/20_idx5_x1001_y2051.png",
        "20/20_idx5_x1051_y2001.png",
        "21/21_idx5_x0_y0.png",
    ]
    assert all(r["label"] == "" for r in rows)
    assert not (out / "metrics.json").exists() and not (out / "confusion.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] is None and summary["labelled"] == 0
    patients = {r["patient"]: r for r in _csv(out / "patients.csv")}
    assert patients["20"]["patches"] == "3" and patients["20"]["true_idc_share"] == ""
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["20.png", "21.png"]
    printed = capsys.readouterr()
    assert "no labels in the file names: no metrics" in printed.out
    assert "patient 20: " in printed.out and "not a patch name" not in printed.err


def test_one_patients_folder_is_accepted(tmp_path, new_slides, model_file) -> None:
    assert _predict(tmp_path, model_file, new_slides / "20", "--no-heatmaps") == 0
    rows = _csv(tmp_path / "out" / "predictions.csv")
    assert {r["patient"] for r in rows} == {"20"} and len(rows) == 3
    assert {r["file"] for r in rows} >= {"20_idx5_x1001_y2001.png"}


def test_labelled_patient_folder_gives_metrics(tmp_path, folder, model_file) -> None:
    assert _predict(tmp_path, model_file, folder / "10", "--no-heatmaps") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["examples"] == 4 and sum(map(sum, metrics["confusion"])) == 4


def test_metrics_cover_only_the_labelled_patches(tmp_path, folder, model_file) -> None:
    _unlabelled(folder, "12", 0, 0)
    model, meta = load_network(model_file)
    summary = run_predict(model, folder, tmp_path / "out", meta, device="cpu", heatmap_cell=None)
    assert summary["patches"] == 7 and summary["labelled"] == 6
    assert summary["metrics"]["examples"] == 6


def _model_with(tmp_path: Path, **record) -> Path:
    arrays = model_arrays(build_model("group", seed=0))
    return save_model(tmp_path / "rec.idc", arrays, {"run_id": "r1", "rounds": 3, **record})


def test_threshold_comes_from_the_flag_then_the_record_then_the_default(
    tmp_path, new_slides, model_file, capsys
) -> None:
    out = tmp_path / "out"
    assert _predict(tmp_path, model_file, new_slides, "--no-heatmaps") == 0
    rows = _csv(out / "predictions.csv")
    assert {(r["threshold"], r["threshold_source"]) for r in rows} == {("0.5", "default")}
    probs = [float(r["probability"]) for r in rows]
    cut = sorted(probs)[1]  # a threshold that calls exactly three of the four patches IDC
    assert _predict(tmp_path, model_file, new_slides, "--no-heatmaps", "--threshold", str(cut)) == 0
    rows = _csv(out / "predictions.csv")
    assert {r["threshold_source"] for r in rows} == {"command-line"}
    assert sum(int(r["predicted"]) for r in rows) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"]["origin"] == "command-line"
    assert summary["threshold"]["value"] == pytest.approx(cut)
    recorded = _model_with(tmp_path, threshold=0.42, threshold_source="validation, 3 sites")
    assert _predict(tmp_path, recorded, new_slides, "--no-heatmaps") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"]["value"] == 0.42
    assert summary["threshold"]["origin"] == "model-record"
    assert "validation, 3 sites" in summary["threshold"]["detail"]
    assert "decision threshold: 0.42 (model record: validation, 3 sites)" in capsys.readouterr().out


def test_bad_thresholds_are_one_line_errors(tmp_path, new_slides, model_file, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _predict(tmp_path, model_file, new_slides, "--threshold", "1.5")
    assert exit_.value.code == 2 and "between 0 and 1" in capsys.readouterr().err
    broken = _model_with(tmp_path, threshold="high")
    assert _predict(tmp_path, broken, new_slides) != 0
    err = capsys.readouterr().err
    assert "threshold 'high' is not a number" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_batch_size_zero_is_refused_not_read_as_the_default(
    tmp_path, new_slides, model_file, capsys
) -> None:
    assert _predict(tmp_path, model_file, new_slides, "--batch-size", "0") == 2
    err = capsys.readouterr().err
    assert "--batch-size must be >= 1, got 0" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_best_threshold_known_answer_and_brute_force() -> None:
    labels = np.array([0, 0, 1, 1])
    best = best_threshold(labels, np.array([0.1, 0.4, 0.35, 0.8]))
    # 0.35 and 0.8 both give balanced accuracy 0.75; the tie goes to the one nearer 0.5
    assert best == {"threshold": 0.35, "balanced_accuracy": 0.75}
    assert best_threshold(np.array([1, 1]), np.array([0.2, 0.9])) is None
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, 30)
        labels[:2] = (0, 1)
        probs = np.round(rng.random(30), 2)  # ties on purpose
        got = best_threshold(labels, probs)
        brute = max(score(labels, probs, 0.0, t).balanced_accuracy for t in np.unique(probs))
        assert got is not None and got["balanced_accuracy"] == pytest.approx(brute)
        at = score(labels, probs, 0.0, got["threshold"]).balanced_accuracy
        assert at == pytest.approx(got["balanced_accuracy"])


def test_heatmap_names_the_model_share_and_threshold(tmp_path, monkeypatch) -> None:
    titles: list[str] = []
    original = Figure.suptitle

    def spy(self, text, **kwargs):
        titles.append(text)
        return original(self, text, **kwargs)

    monkeypatch.setattr(Figure, "suptitle", spy)
    images = np.zeros((4, 50, 50, 3), np.uint8)
    plot_patient(
        "20",
        images,
        np.array([0, 50, 100, 150]),
        np.zeros(4, int),
        np.array([0.1, 0.6, 0.7, 0.2]),
        tmp_path / "h.png",
        threshold=0.65,
        caption=model_caption(
            {"run_id": "r9", "rounds": 5, "weights_digest": "ab" * 32}, Path("m.idc")
        ),
    )
    (title,) = titles
    assert "patient 20: 1 of 4 patches predicted IDC (25.0%, P(IDC) >= 0.65)" in title
    assert "run r9, 5 rounds, weights abababababab" in title


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_inference_shows_progress_on_a_terminal_only(monkeypatch) -> None:
    model = build_model("group", seed=0)
    images = np.zeros((6, 50, 50, 3), np.uint8)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    infer(model, images, torch.device("cpu"), batch_size=2)
    assert "predicting" in terminal.getvalue() and "/3 [" in terminal.getvalue()
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    infer(model, images, torch.device("cpu"), batch_size=2)
    assert piped.getvalue() == ""
