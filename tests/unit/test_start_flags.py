"""`idc-client start` flags that weaken security say so before anything else happens."""

from __future__ import annotations

from client import cli as client_cli


def test_insecure_start_warns_before_anything_else(tmp_path, capsys):
    args = ["start", "--dir", str(tmp_path / "site"), "--server", "127.0.0.1:1"]
    code = client_cli.main([*args, "--data", str(tmp_path / "none"), "--insecure"])
    err = capsys.readouterr().err
    assert code == 2  # the missing site folder still stops it, after the warning
    assert err.startswith("WARNING: --insecure") and "patient data" in err


def test_a_secure_start_does_not_warn(tmp_path, capsys):
    args = ["start", "--dir", str(tmp_path / "site"), "--server", "127.0.0.1:1"]
    assert client_cli.main([*args, "--data", str(tmp_path / "none")]) == 2
    assert "WARNING" not in capsys.readouterr().err
