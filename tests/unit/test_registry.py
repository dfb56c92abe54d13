"""The coordinator's registry: plain names, declared patch counts, owner-only state."""

from __future__ import annotations

import json
import stat

import pytest

from common import keys
from common.paths import CoordPaths, check_name
from common.registry import add_site, declared_patches, save_sites
from server import cli as server_cli


def mode(path) -> int:  # noqa: ANN001
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("name", ["hosp1\n", "hosp1\r\n", "", "-x", "a b", "a/b", "x" * 65])
def test_names_that_are_not_plain_are_refused(name):
    with pytest.raises(ValueError, match="site name"):
        check_name(name)


def test_plain_names_pass():
    assert check_name("hosp-1.a_b") == "hosp-1.a_b"


@pytest.fixture
def coord(tmp_path):
    paths = CoordPaths(tmp_path / "coord")
    assert server_cli.main(["init", "--dir", str(paths.root)]) == 0
    return paths


def test_init_makes_an_owner_only_folder_and_audit_log(coord):
    assert mode(coord.root) == 0o700
    assert mode(coord.audit) == 0o600 and mode(coord.audit.parent) == 0o700
    assert mode(coord.key) == 0o600 and mode(coord.sites) == 0o600


def test_a_folder_made_by_an_older_version_is_tightened_on_use(coord):
    coord.root.chmod(0o755)
    coord.require()
    assert mode(coord.root) == 0o700


def test_add_site_records_the_declared_patch_count(coord, tmp_path, capsys):
    keys.generate_key_pair(tmp_path / "h1.key", tmp_path / "h1.pub")
    keys.generate_key_pair(tmp_path / "h2.key", tmp_path / "h2.pub")
    args = ["add-site", "--dir", str(coord.root), "--name", "h1", "--key", str(tmp_path / "h1.pub")]
    assert server_cli.main([*args, "--patches", "1200"]) == 0
    assert "at most 1200 examples" in capsys.readouterr().out
    add_site(coord, "h2", tmp_path / "h2.pub")
    assert declared_patches(coord) == {"h1": 1200}
    entry = json.loads(coord.audit.read_text().splitlines()[-1])
    assert entry["action"] == "site.registered" and entry["details"]["patches"] == 1200


@pytest.mark.parametrize("patches", [0, -5])
def test_a_declared_patch_count_must_be_positive(coord, tmp_path, patches):
    keys.generate_key_pair(tmp_path / "h.key", tmp_path / "h.pub")
    with pytest.raises(ValueError, match="--patches"):
        add_site(coord, "h", tmp_path / "h.pub", patches)


def test_a_registry_entry_that_is_not_a_count_declares_nothing(coord):
    save_sites(coord, {"h": {"patches": True}, "g": {"patches": "12"}})
    assert declared_patches(coord) == {}
