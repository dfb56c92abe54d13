from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.cli import main
from client.heatmap import grid_cells, mosaic, probability_grid, region_edges
from client.predict import infer, load_network, run_predict
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
