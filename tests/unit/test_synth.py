"""Tests for the synthetic IDC patch generator."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulation.synth import FIRST_PATIENT_ID, SynthSpec, synthesize

NAME = re.compile(r"^(\d+)_idx5_x(\d+)_y(\d+)_class([01])\.png$")
SMALL = SynthSpec(patients=3, patches_per_patient=(12, 20), seed=5)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth") / "out"
    return out, synthesize(out, SMALL)


def test_layout_and_file_names(small):
    out, summary = small
    files = sorted(out.rglob("*.png"))
    assert len(files) == summary.patches > 0
    seen = set()
    for f in files:
        match = NAME.match(f.name)
        assert match, f.name
        patient, x, y, label = match.groups()
        rel = f.relative_to(out).parts
        assert rel == (patient, label, f.name)
        assert int(patient) >= FIRST_PATIENT_ID
        assert int(x) % 50 == 0 and int(y) % 50 == 0
        assert (patient, x, y) not in seen  # one patch per grid cell
        seen.add((patient, x, y))
        with Image.open(f) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (50, 50)


def test_summary_matches_files_and_manifest(small):
    out, summary = small
    assert summary.patients == ["20000", "20001", "20002"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == summary.patients
    assert summary.positives == len(list(out.glob("*/1/*.png")))
    assert summary.patches - summary.positives == len(list(out.glob("*/0/*.png")))
    lo, hi = SMALL.patches_per_patient
    for pid in summary.patients:
        assert lo <= len(list((out / pid).rglob("*.png"))) <= hi
    doc = json.loads((out / "synth.json").read_text())
    assert doc["complete"] is True
    assert doc["site_of"] == summary.site_of
    assert doc["spec"] == json.loads(json.dumps(dataclasses.asdict(SMALL)))
    assert (doc["patches"], doc["positives"]) == (summary.patches, summary.positives)
    assert summary.seconds > 0


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    synthesize(again, SMALL)
    assert _files(again) == _files(out)
    assert (again / "synth.json").read_bytes() == (out / "synth.json").read_bytes()
    other = tmp_path / "other"
    synthesize(other, dataclasses.replace(SMALL, seed=6))
    assert _files(other) != _files(out)


def test_workers_do_not_change_output(small, tmp_path):
    out, _ = small
    synthesize(tmp_path / "w2", SMALL, workers=2)
    assert _files(tmp_path / "w2") == _files(out)


def test_sites_round_robin_and_stain_shift(tmp_path):
    base = SynthSpec(patients=5, patches_per_patient=(3, 4), seed=1)
    plain = synthesize(tmp_path / "plain", base)
    assert set(plain.site_of.values()) == {0}
    # sites without a shift only label patients; the pixels stay the same.
    labelled = synthesize(tmp_path / "labelled", dataclasses.replace(base, sites=2))
    assert labelled.site_of == {"20000": 0, "20001": 1, "20002": 0, "20003": 1, "20004": 0}
    assert json.loads((tmp_path / "labelled" / "synth.json").read_text())["site_of"] == {
        "20000": 0,
        "20001": 1,
        "20002": 0,
        "20003": 1,
        "20004": 0,
    }
    assert _files(tmp_path / "labelled") == _files(tmp_path / "plain")
    synthesize(tmp_path / "shifted", dataclasses.replace(base, sites=2, site_shift=1.0))
    assert _files(tmp_path / "shifted").keys() == _files(tmp_path / "plain").keys()
    assert _files(tmp_path / "shifted") != _files(tmp_path / "plain")


def test_positives_are_darker_and_more_purple(tmp_path):
    spec = SynthSpec(patients=6, patches_per_patient=(30, 30), positive_fraction=(0.5, 0.5))
    out = tmp_path / "stats"
    synthesize(out, spec)
    stats: dict[int, list[list[float]]] = {0: [], 1: []}
    for f in out.rglob("*.png"):
        rgb = np.asarray(Image.open(f), dtype=np.float64)
        dark = (rgb.sum(axis=-1) < 450).mean()  # share of nucleus-dark pixels
        purple = (rgb[..., 2] - rgb[..., 0]).mean()  # haematoxylin takes red, eosin barely
        stats[int(f.parent.name)].append([rgb.mean(), dark, purple])
    neg, pos = np.array(stats[0]), np.array(stats[1])
    assert len(neg) == len(pos) == 90
    brightness, dark, purple = (pos.mean(axis=0) - neg.mean(axis=0)).tolist()
    assert brightness < -5.0
    assert dark > 0.08
    assert purple > 8.0


def test_rerun_replaces_previous_output(tmp_path):
    out = tmp_path / "out"
    synthesize(out, SynthSpec(patients=4, patches_per_patient=(2, 3)))
    summary = synthesize(out, SynthSpec(patients=2, patches_per_patient=(2, 3), seed=9))
    assert sorted(p.name for p in out.iterdir()) == ["20000", "20001", "synth.json"]
    assert len(list(out.rglob("*.png"))) == summary.patches


def test_refuses_foreign_output_folder(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="synth.json"):
        synthesize(foreign, SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    mixed = tmp_path / "mixed"
    synthesize(mixed, SynthSpec(patients=1, patches_per_patient=(1, 1)))
    (mixed / "12345").mkdir()
    with pytest.raises(ValueError, match="12345"):
        synthesize(mixed, SMALL)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="folder"):
        synthesize(a_file, SMALL)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("patients", 0),
        ("patients", True),
        ("patches_per_patient", (5, 4)),
        ("patches_per_patient", (0, 4)),
        ("patches_per_patient", (4,)),
        ("seed", -1),
        ("sites", 0),
        ("sites", 13),
        ("site_shift", -0.5),
        ("site_shift", float("nan")),
        ("site_shift", 1.5),
        ("positive_fraction", (0.6, 0.1)),
        ("positive_fraction", (-0.1, 0.5)),
        ("positive_fraction", (0.5, 1.5)),
    ],
)
def test_bad_spec_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SynthSpec(**{field: value})


def test_bad_workers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        synthesize(tmp_path / "out", SMALL, workers=0)
