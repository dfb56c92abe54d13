import io
import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

from common import patch_decode
from common.data import UNLABELLED, LoadOptions, NoUsableData, load_patches, scan
from tests.conftest import write_patch


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "data"
    write_patch(root, "100", 0, 0, 0, value=10)
    write_patch(root, "100", 50, 0, 1, value=20)
    write_patch(root, "101", 0, 50, 1, value=30)
    write_patch(root, "101", 0, 100, 0, folder="1")  # folder disagrees with name
    write_patch(root, "102", 0, 0, 0, size=(50, 1), value=40)  # a border strip
    write_patch(root, "102", 50, 0, 0, size=(42, 50), value=50)
    write_patch(root, "103", 0, 0, 1, mode="RGBA", value=60)
    write_patch(root, "103", 50, 0, 1, mode="L", value=70)
    (root / "103" / "1" / "103_idx5_x100_y0_class1.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    trunc = write_patch(root, "103", 150, 0, 0)
    trunc.write_bytes(trunc.read_bytes()[:60])  # truncated file
    (root / "100" / "0" / "notes.txt").write_text("hello")
    (root / "100" / "0" / "100_idx5_x0_y0_class0.jpg").write_text("x")
    (root / "stray.png").write_bytes(b"")
    return root


def test_scan_reads_names_and_reports_bad_layout(messy):
    records, report = scan(messy)
    facts = {(r.patient, r.x, r.y, r.label) for r in records}
    assert facts >= {("100", 50, 0, 1), ("101", 0, 50, 1)}
    assert report.mislabelled == ["101/1/101_idx5_x0_y100_class0.png"]
    assert sorted(report.ignored) == [
        "100/0/100_idx5_x0_y0_class0.jpg",
        "100/0/notes.txt",
        "stray.png",
    ]


def test_every_messy_case_has_its_behaviour(messy):
    ps = load_patches(messy)
    rep = ps.report
    assert sorted(rep.unreadable) == [
        "103/0/103_idx5_x150_y0_class0.png",
        "103/1/103_idx5_x100_y0_class1.png",
    ]
    assert sorted(rep.small_padded) == [
        "102/0/102_idx5_x0_y0_class0.png",
        "102/0/102_idx5_x50_y0_class0.png",
    ]
    assert sorted(rep.converted) == [
        "103/1/103_idx5_x0_y0_class1.png",
        "103/1/103_idx5_x50_y0_class1.png",
    ]
    assert rep.usable == len(ps) == 7 and rep.patients == 4
    assert (rep.negatives, rep.positives) == (3, 4)
    assert ps.images.shape == (7, 50, 50, 3) and ps.images.dtype == np.uint8
    strip = ps.images[ps.files.index("102/0/102_idx5_x0_y0_class0.png")]
    assert (strip[0] == 40).all() and (strip[1:] == 255).all()  # padded, never stretched
    wide = ps.images[ps.files.index("102/0/102_idx5_x50_y0_class0.png")]
    assert (wide[:, :42] == 50).all() and (wide[:, 42:] == 255).all()
    grey = ps.images[ps.files.index("103/1/103_idx5_x50_y0_class1.png")]
    assert (grey == 70).all()


def test_skip_policy_drops_small_patches(messy):
    ps = load_patches(messy, options=LoadOptions(small="skip"))
    assert len(ps.report.small_skipped) == 2 and len(ps) == 5


def test_background_colour_is_configurable(messy):
    ps = load_patches(messy, options=LoadOptions(background=(0, 0, 0)))
    strip = ps.images[ps.files.index("102/0/102_idx5_x0_y0_class0.png")]
    assert (strip[1:] == 0).all()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="stretch"):
        LoadOptions(small="stretch")  # type: ignore[arg-type]


def test_kaggle_subfolder_is_found(tmp_path):
    write_patch(tmp_path / "IDC_regular_ps50_idx5", "9", 0, 0, 1)
    assert load_patches(tmp_path).patients.tolist() == ["9"]


def test_folder_without_usable_patch_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoUsableData, match="empty"):
        load_patches(tmp_path / "empty")
    bad = tmp_path / "bad"
    (bad / "1" / "0").mkdir(parents=True)
    (bad / "1" / "0" / "1_idx5_x0_y0_class0.png").write_bytes(b"nope")
    with pytest.raises(NoUsableData, match="bad"):
        load_patches(bad)
    with pytest.raises(NoUsableData, match="missing"):
        load_patches(tmp_path / "missing")


def test_cache_second_load_reads_no_png(messy, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_patches(messy, cache_dir=cache)
    monkeypatch.setattr(
        patch_decode, "_decode_file", lambda *a: pytest.fail("decoded a PNG on a cache hit")
    )
    second = load_patches(messy, cache_dir=cache)
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(first.images, second.images)
    assert second.files == first.files and second.report == first.report


def test_cache_rebuilds_when_a_file_changes(messy, tmp_path):
    cache = tmp_path / "cache"
    first = load_patches(messy, cache_dir=cache)
    path = messy / "100" / "0" / "100_idx5_x0_y0_class0.png"
    write_patch(messy, "100", 0, 0, 0, value=200)
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    second = load_patches(messy, cache_dir=cache)
    assert (second.images[second.files.index("100/0/100_idx5_x0_y0_class0.png")] == 200).all()
    write_patch(messy, "104", 0, 0, 1)
    third = load_patches(messy, cache_dir=cache)
    assert len(third) == len(second) + 1
    assert third.fingerprint != first.fingerprint  # the data set's identity: names and sizes
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1  # old pruned


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for i in range(40):
        write_patch(root, str(i % 4), i * 50, 0, i % 2)
    monkeypatch.setattr(patch_decode, "PARALLEL_MIN_FILES", 10)
    a, b = load_patches(root, workers=1), load_patches(root, workers=2)
    assert np.array_equal(a.images, b.images) and a.files == b.files


def write_unlabelled(root, patient, x, y, *, folder=None, value=None):
    """Write one patch named without a class: <patient>_idx5_x<X>_y<Y>.png."""
    d = root if folder == "" else root / (folder if folder is not None else patient)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{patient}_idx5_x{x}_y{y}.png"
    arr = np.full((50, 50, 3), 90 if value is None else value, dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path


def test_unlabelled_folder_of_patients_loads_when_labels_are_optional(tmp_path):
    root = tmp_path / "new"
    write_unlabelled(root, "7", 0, 0)
    write_unlabelled(root, "7", 50, 0)
    write_unlabelled(root, "8", 0, 50)
    write_patch(root, "9", 0, 0, 1)  # a labelled patient beside them
    ps = load_patches(root, require_labels=False)
    assert sorted(ps.files) == [
        "7/7_idx5_x0_y0.png",
        "7/7_idx5_x50_y0.png",
        "8/8_idx5_x0_y50.png",
        "9/1/9_idx5_x0_y0_class1.png",
    ]
    by_file = dict(zip(ps.files, ps.labels.tolist(), strict=True))
    assert by_file["7/7_idx5_x0_y0.png"] == UNLABELLED
    assert by_file["9/1/9_idx5_x0_y0_class1.png"] == 1
    rep = ps.report
    assert (rep.usable, rep.patients, rep.unlabelled, rep.positives, rep.negatives) == (
        4,
        3,
        3,
        1,
        0,
    )
    assert rep.no_label == [] and "3 unlabelled" in rep.summary()


@pytest.mark.parametrize("labelled", [False, True])
def test_one_patients_folder_loads_when_labels_are_optional(tmp_path, labelled):
    root = tmp_path / "slide"
    if labelled:  # <0|1>/<patient>_..._class<0|1>.png: the Kaggle patient folder itself
        for x, label in ((0, 0), (50, 1)):
            d = root / str(label)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(
                d / f"12_idx5_x{x}_y0_class{label}.png"
            )
    else:
        write_unlabelled(root, "12", 0, 0, folder="")
        write_unlabelled(root, "12", 50, 0, folder="")
    ps = load_patches(root, require_labels=False)
    assert len(ps) == 2 and set(ps.patients.tolist()) == {"12"}
    assert sorted(ps.xs.tolist()) == [0, 50]
    expected = [0, 1] if labelled else [UNLABELLED, UNLABELLED]
    assert sorted(ps.labels.tolist()) == expected


def test_training_loader_never_takes_unlabelled_patches(tmp_path):
    root = tmp_path / "mixed"
    write_patch(root, "1", 0, 0, 0)
    write_unlabelled(root, "1", 50, 0)
    write_unlabelled(root, "2", 0, 0)
    ps = load_patches(root)
    assert ps.files == ["1/0/1_idx5_x0_y0_class0.png"] and (ps.labels >= 0).all()
    assert ps.report.no_label == ["1/1_idx5_x50_y0.png", "2/2_idx5_x0_y0.png"]
    assert "no label (never used for training): 2" in ps.report.summary()
    one = tmp_path / "one"
    write_patch(one, "3", 0, 0, 1)  # one patient's labelled folder: only for predict
    (one / "3" / "1").rename(one / "1")
    (one / "3").rmdir()
    with pytest.raises(NoUsableData, match="no patch files"):
        load_patches(one)


def test_only_unlabelled_patches_say_why_training_cannot_use_them(tmp_path):
    root = tmp_path / "new"
    write_unlabelled(root, "7", 0, 0)
    write_unlabelled(root, "7", 50, 0)
    with pytest.raises(NoUsableData) as err:
        load_patches(root)
    message = str(err.value)
    assert str(root) in message and "2 patches have no label" in message
    assert "idc-client predict" in message


def test_unlabelled_patch_in_another_patients_folder_is_mislabelled(tmp_path):
    root = tmp_path / "new"
    write_unlabelled(root, "7", 0, 0)
    write_unlabelled(root, "8", 0, 0, folder="7")  # patient 8's patch in 7's folder
    write_unlabelled(root, "7", 0, 50, folder="7/deeper")  # no layout puts a patch here
    records, report = scan(root, require_labels=False)
    assert [r.path for r in records] == ["7/7_idx5_x0_y0.png"]
    assert report.mislabelled == ["7/8_idx5_x0_y0.png"]
    assert report.ignored == ["7/deeper/7_idx5_x0_y50.png"]


def test_ignored_files_are_one_log_line_with_the_first_names(tmp_path, caplog):
    root = tmp_path / "d"
    write_patch(root, "1", 0, 0, 0)
    for i in range(12):
        (root / "1" / "0" / f"note{i:02d}.txt").write_text("x")
    with caplog.at_level(logging.INFO, logger="common.data"):
        scan(root)
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1
    assert "ignored 12 files" in lines[0] and "note04.txt" in lines[0]
    assert "note05.txt" not in lines[0] and "... and 7 more" in lines[0]


def test_unreadable_patches_are_one_warning(tmp_path, caplog):
    root = tmp_path / "d"
    write_patch(root, "1", 0, 0, 0)
    for x in range(50, 400, 50):
        (root / "1" / "0" / f"1_idx5_x{x}_y0_class0.png").write_bytes(b"junk")
    with caplog.at_level(logging.INFO, logger="common"):
        ps = load_patches(root)
    assert len(ps.report.unreadable) == 7
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipped 7 unreadable" in warnings[0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_first_decode_shows_progress_on_a_terminal_only(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for i in range(6):
        write_patch(root, "1", i * 50, 0, i % 2)
    monkeypatch.setattr(patch_decode, "PROGRESS_DELAY_S", 0)
    monkeypatch.setattr(patch_decode, "CHUNK", 2)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_patches(root, cache_dir=tmp_path / "cache")
    shown = terminal.getvalue()
    assert "decoding patches" in shown and "/6 [" in shown  # a bar over the 6 files
    terminal.seek(0)
    terminal.truncate()
    load_patches(root, cache_dir=tmp_path / "cache")  # a cache hit decodes nothing
    assert "decoding" not in terminal.getvalue()
    piped = io.StringIO()  # not a terminal: a log file, a test's capture
    monkeypatch.setattr(sys, "stderr", piped)
    load_patches(root)
    assert piped.getvalue() == ""


def test_labelled_folder_shares_its_cache_entry_with_predict(messy, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    trained = load_patches(messy, cache_dir=cache)
    monkeypatch.setattr(
        patch_decode, "_decode_file", lambda *a: pytest.fail("decoded a PNG on a cache hit")
    )
    scored = load_patches(messy, cache_dir=cache, require_labels=False)
    assert scored.files == trained.files and scored.report == trained.report


def test_cache_entries_of_an_older_report_still_read(messy, tmp_path):
    cache = tmp_path / "cache"
    first = load_patches(messy, cache_dir=cache)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    meta = json.loads((entry / "meta.json").read_text())
    del meta["report"]["no_label"], meta["report"]["unlabelled"]  # written before they existed
    meta["report"]["retired_field"] = 1  # and one a later version dropped
    (entry / "meta.json").write_text(json.dumps(meta))
    again = load_patches(messy, cache_dir=cache)
    assert again.files == first.files and again.report.no_label == []


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [14000, 60])  # past PIL's bomb limit; just too large
def test_an_oversized_png_with_a_patch_name_is_counted_unreadable(tmp_path, side):
    root = tmp_path / "data"
    write_patch(root, "200", 0, 0, 0)
    bomb = root / "200" / "1" / "200_idx5_x50_y0_class1.png"
    bomb.parent.mkdir(parents=True)
    bomb.write_bytes(_png_header_only(side, side))
    ps = load_patches(root)
    assert ps.report.unreadable == ["200/1/200_idx5_x50_y0_class1.png"]
    assert len(ps) == 1
