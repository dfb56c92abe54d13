"""The config hash across releases: an older run resumes with its own settings, and only them.

Each older run folder is written the way the release of its time wrote it: that release's
keys in run.json and, in state.json, the hash as its ``RunConfig.digest`` computed it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowerctl
from common import config as cfg
from common.config import RunConfig
from common.config_digest import ADDED, WHOLE_FORMS
from common.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from common.paths import CoordPaths
from common.rundir import RunDir
from server import cli as server_cli
from server.coordinator import Coordinator
from server.link import LIVE_FILE

OLD_RUN = RunConfig(seed=7, norm="group", local_epochs=2, min_sites=1)
# Valid by construction (no filtering); the later keys often at their added values, often not.
runs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "local_epochs": st.integers(1, 5),
        "learning_rate": st.floats(1e-6, 1.0),
        "norm": st.sampled_from(["batch", "group"]),
        "strategy": st.sampled_from(cfg.STRATEGIES),
        "proximal_mu": st.sampled_from([0.01, 0.1]),
        "server_learning_rate": st.sampled_from([0.0, 0.5]),
        "server_momentum": st.sampled_from([0.9, 0.5]),
        "precision": st.sampled_from(cfg.PRECISIONS),
        "channels_last": st.sampled_from(cfg.CHANNELS_LAST),
        "model": st.sampled_from(cfg.MODEL_KINDS),
        "augment": st.sampled_from(cfg.AUGMENTS),
        "weight_decay": st.sampled_from([0.0, 1e-4]),
        "lr_schedule": st.sampled_from(cfg.LR_SCHEDULES),
        "ema": st.sampled_from([0.0, 0.99]),
    }
).map(lambda kwargs: RunConfig(**kwargs))


def release_record(run: RunConfig, known: int) -> tuple[dict[str, Any], str]:
    """run.json's config and state.json's hash as a release knowing ``known`` of ADDED wrote
    them: its keys only, hashed whole (the digest of every release before this module)."""
    later = {key for key, _ in ADDED[known:]}
    config = {k: v for k, v in run.to_run_config().items() if k not in later}
    digested = {k: v for k, v in config.items() if k not in ("run-dir", "resume")}
    return config, hashlib.sha256(json.dumps(digested, sort_keys=True).encode()).hexdigest()


def old_run_folder(tmp_path: Path, run: RunConfig, known: int) -> tuple[Path, Path]:
    """A coordinator folder and a run folder with one round done by an older release."""
    coord = tmp_path / "coord"
    assert server_cli.main(["init", "--dir", str(coord)]) == 0
    (coord / LIVE_FILE).write_text(json.dumps({"local_address": "127.0.0.1:1"}))
    run_dir = tmp_path / "run"
    run = replace(run, run_dir=str(run_dir), coord_dir=str(coord))
    config, recorded = release_record(run, known)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "5", "config": config}))
    RunDir(run_dir).commit_round(1, {"round": 1}, {"w": np.zeros(2)}, {"config_hash": recorded})
    return coord, run_dir


def resume(coord: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> Any:
    """``idc-server run --resume`` up to the submission; returns its exit code and config."""
    submitted: dict[str, Any] = {}

    def accepted(conn: Any, root: Any, config: dict[str, Any]) -> int:
        submitted.update(config)
        return 4243

    def detach(*args: Any, **kwargs: Any) -> int:
        raise KeyboardInterrupt  # the submission is what is checked here

    monkeypatch.setattr(flowerctl, "submit_run", accepted)
    monkeypatch.setattr(flowerctl, "follow_run", detach)
    argv = ["run", "--dir", str(coord), "--resume", str(run_dir), *extra]
    return server_cli.main(argv), submitted


@pytest.mark.parametrize("known", WHOLE_FORMS)
def test_a_run_of_an_earlier_release_resumes_with_its_own_settings(
    known: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord, run_dir = old_run_folder(tmp_path, OLD_RUN, known)
    code, submitted = resume(coord, run_dir, monkeypatch)
    assert code == EXIT_INTERRUPTED, "the resume was refused before its submission"
    started = RunConfig.from_run_config(submitted)  # what the ServerApp's context holds
    assert (started.seed, started.norm, started.local_epochs) == (7, "group", 2)
    coordinator = Coordinator(started, run_dir, "4243")  # refused here on the old code
    coordinator.close()
    for key, value in ADDED[known:]:  # keys the run predates keep what it did
        assert submitted[key] == value, key
    (entry,) = [
        json.loads(line)
        for line in CoordPaths(coord).audit.read_text().splitlines()
        if '"run.resumed"' in line
    ]
    assert entry["details"]["completed_round"] == 1


@pytest.mark.parametrize(
    ("override", "says"),
    [("seed=8", "seed 7 -> 8"), ('precision="auto"', "precision 'fp32' -> 'auto'")],
)
def test_a_changed_setting_is_refused_before_submission_in_one_line(
    override: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    coord, run_dir = old_run_folder(tmp_path, OLD_RUN, 0)
    record = (run_dir / "run.json").read_text()
    capsys.readouterr()
    code, submitted = resume(coord, run_dir, monkeypatch, "--run-config", override)
    assert code == EXIT_BAD_INPUT and not submitted
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(run_dir) in lines[0] and says in lines[0] and "--out" in lines[0]
    assert (run_dir / "run.json").read_text() == record  # the run's settings are kept


def test_the_server_app_refuses_a_changed_setting_of_an_older_run(tmp_path: Path) -> None:
    coord, run_dir = old_run_folder(tmp_path, OLD_RUN, 0)
    changed = replace(OLD_RUN, seed=8, run_dir=str(run_dir), coord_dir=str(coord), resume=True)
    with pytest.raises(ValueError, match="cannot resume"):
        Coordinator(changed, run_dir, "4244")


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    return value + "x"


@settings(max_examples=50, deadline=None)
@given(runs)
def test_every_digested_setting_changes_the_hash(run: RunConfig) -> None:
    for f in fields(RunConfig):
        if RunConfig.key(f.name) in ("run-dir", "resume"):
            continue
        moved = replace(run, **{f.name: _changed(getattr(run, f.name))})
        assert moved.digest() != run.digest(), f.name
        assert not moved.matches(run.digest()), f.name


@settings(max_examples=50, deadline=None)
@given(runs)
def test_earlier_releases_hashes_match_only_settings_they_could_run(run: RunConfig) -> None:
    at_added = RunConfig.from_run_config({**run.to_run_config(), **dict(ADDED)})
    assert at_added.digest() == release_record(at_added, 0)[1]  # the first release's form
    assert all(at_added.matches(release_record(at_added, k)[1]) for k in WHOLE_FORMS)
    for known in WHOLE_FORMS:
        later = dict(ADDED[known:])
        if any(run.to_run_config()[key] != value for key, value in later.items()):
            assert not run.matches(release_record(run, known)[1]), known
