import os

import numpy as np
import pytest

import common.data as D
from common.data import LoadOptions, NoUsableData, load_patches, scan
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
    monkeypatch.setattr(D, "_decode_file", lambda *a: pytest.fail("decoded a PNG on a cache hit"))
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
    monkeypatch.setattr(D, "PARALLEL_MIN_FILES", 10)
    a, b = load_patches(root, workers=1), load_patches(root, workers=2)
    assert np.array_equal(a.images, b.images) and a.files == b.files


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
