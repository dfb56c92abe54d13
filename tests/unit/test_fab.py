"""Is a FAB the installed app? Bundles built by Flower's own builder, then tampered one way each."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from client.executor import PROJECT_ROOT
from flowerctl.fab import MAX_UNPACKED, InstalledApp, fab_hash

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyapp"
version = "{version}"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "acme"

[tool.flwr.app.components]
serverapp = "tiny.apps:server"
clientapp = "tiny.apps:client"

[tool.flwr.app.config]
rounds = 3
dp.delta = 1e-5

[tool.flwr.federations]
default = "local"

[tool.flwr.federations.local]
address = "127.0.0.1:9093"
"""


def make_app(root: Path, version: str = "1.0.0", body: str = "x = 1\n") -> Path:
    (root / "tiny").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(version=version))
    (root / "tiny" / "__init__.py").write_text('"""Tiny."""\n')
    (root / "tiny" / "apps.py").write_text(body)
    (root / "README.md").write_text("# tiny\n")
    return root


def build(root: Path) -> bytes:
    # `flwr build` refuses [tool.flwr.federations] in place; `flwr run` strips it: do the same
    text = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(text.split("[tool.flwr.federations]")[0])
    try:
        return build_fab_from_disk(root)
    finally:
        (root / "pyproject.toml").write_text(text)


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, data in files.items():
            fab.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def installed(tmp_path):
    return InstalledApp.snapshot(make_app(tmp_path / "installed"))


def test_the_installed_idc_fl_matches_the_fab_flower_builds_from_it():
    app = InstalledApp.snapshot(PROJECT_ROOT)
    files: dict[str, bytes | Path] = {rel: PROJECT_ROOT / rel for rel in app.files}
    files[".gitignore"] = PROJECT_ROOT / ".gitignore"
    fab, _ = build_fab_from_files(files)
    assert app.mismatch(fab) is None
    assert app.label.startswith("idc-fl ")


def test_the_fab_carries_the_packages_and_not_tests_benchmarks_deploy_or_reports():
    fab = build_fab_from_disk(PROJECT_ROOT)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        tops = {PurePosixPath(name).parts[0] for name in bundle.namelist()}
    assert {"common", "client", "server", "simulation", "flowerctl", "README.md"} <= tops
    assert not tops & {"tests", "benchmarks", "deploy", "docs"}
    assert InstalledApp.snapshot(PROJECT_ROOT).mismatch(fab) is None


def test_same_files_same_bundle_hash_and_accepted(tmp_path, installed):
    fab = build(make_app(tmp_path / "copy"))
    assert installed.mismatch(fab) is None
    assert fab_hash(fab) == fab_hash(build(make_app(tmp_path / "again")))


def test_a_changed_source_file_is_named(tmp_path, installed):
    fab = build(make_app(tmp_path / "evil", body="import os; os.system('id')\n"))
    assert (
        installed.mismatch(fab)
        == "carries a file that differs from the installed one: tiny/apps.py"
    )


def test_a_file_the_installed_app_lacks_is_refused(tmp_path, installed):
    root = make_app(tmp_path / "extra")
    (root / "tiny" / "payload.py").write_text("print('hi')\n")
    assert "does not have: tiny/payload.py" in installed.mismatch(build(root))


def test_another_version_is_refused_naming_both(tmp_path, installed):
    reason = installed.mismatch(build(make_app(tmp_path / "v2", version="2.0.0")))
    assert (
        reason == "pyproject.toml differs from the installed one (tinyapp 2.0.0 vs tinyapp 1.0.0)"
    )


def test_fewer_files_than_installed_is_still_the_app(tmp_path, installed):
    root = make_app(tmp_path / "slim")
    (root / "README.md").unlink()
    assert installed.mismatch(build(root)) is None


@pytest.mark.parametrize("name", ["../escape.py", "/etc/cron.d/x", "tiny\\..\\..\\x.py"])
def test_names_leaving_the_app_folder_are_refused(installed, name):
    pyproject = (installed.root / "pyproject.toml").read_bytes()
    reason = installed.mismatch(zip_of({"pyproject.toml": pyproject, name: b"x"}))
    assert reason is not None and "outside the app folder" in reason


def test_not_a_zip_no_pyproject_and_a_zip_bomb_are_refused(installed):
    assert "not a readable app bundle" in installed.mismatch(b"PK\x03\x04 nonsense")
    assert installed.mismatch(zip_of({"tiny/apps.py": b"x = 1\n"})) == "carries no pyproject.toml"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as fab:
        fab.writestr("big.json", b"0" * (MAX_UNPACKED + 1))
    assert installed.mismatch(buffer.getvalue()) == f"unpacks to more than {MAX_UNPACKED} bytes"


def test_the_snapshot_describes_the_files_at_start(tmp_path):
    root = make_app(tmp_path / "app")
    app = InstalledApp.snapshot(root)
    fab = build(root)
    (root / "tiny" / "apps.py").write_text("x = 2\n")  # changed on disk after the start
    assert app.mismatch(fab) is None
    assert "tiny/apps.py" in InstalledApp.snapshot(root).mismatch(fab)


def test_gitignored_folders_are_not_part_of_the_installed_app(tmp_path):
    # A demo's runs/ holds thousands of JSON files that `flwr build` never ships: the snapshot
    # neither walks nor accepts them, and the bundle Flower builds is still the app.
    root = make_app(tmp_path / "app")
    (root / ".gitignore").write_text("runs/\n*.log.json\n")
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "rounds.json").write_text("{}")
    (root / "tiny" / "debug.log.json").write_text("{}")
    app = InstalledApp.snapshot(root)
    assert "runs/r1/rounds.json" not in app.files
    assert "tiny/debug.log.json" not in app.files
    assert "tiny/apps.py" in app.files
    assert app.mismatch(build(root)) is None
    smuggled = zip_of({"pyproject.toml": (root / "pyproject.toml").read_bytes(), "runs/x.py": b""})
    assert "runs/x.py" in app.mismatch(smuggled)
