from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.audit import LogHead
from common.digests import digest_update
from common.model import build_model
from common.provenance import (
    FORMAT,
    ModelIntegrityError,
    detect_norm,
    load_model,
    run_metadata,
    save_model,
)
from common.site_data import model_arrays


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return model_arrays(build_model("batch", seed=0))


def test_round_trip_keeps_weights_and_record(tmp_path: Path, arrays) -> None:
    path = save_model(tmp_path / "m.idc", arrays, {"run_id": "r1", "rounds": 3})
    loaded, meta = load_model(path)
    assert loaded.keys() == arrays.keys()
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)
    assert meta is not None and meta["run_id"] == "r1" and meta["rounds"] == 3
    assert meta["weights_digest"] == digest_update(arrays)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and json.loads(raw["metadata"])["run_id"] == "r1"


def _tamper(path: Path, edit) -> None:
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)


def test_changed_weight_is_refused(tmp_path: Path, arrays) -> None:
    path = save_model(tmp_path / "m.idc", arrays, {"run_id": "r1"})
    _tamper(path, lambda raw: raw["state_dict"]["stem.0.weight"].view(-1)[0].add_(1e-3))
    with pytest.raises(ModelIntegrityError, match="m.idc"):
        load_model(path)


def test_changed_digest_is_refused(tmp_path: Path, arrays) -> None:
    path = save_model(tmp_path / "m.idc", arrays, {"run_id": "r1"})

    def edit(raw: dict) -> None:
        meta = json.loads(raw["metadata"])
        meta["weights_digest"] = "0" * 64
        raw["metadata"] = json.dumps(meta)

    _tamper(path, edit)
    with pytest.raises(ModelIntegrityError, match="do not match"):
        load_model(path)


def test_metadata_with_wrong_digest_is_not_written(tmp_path: Path, arrays) -> None:
    with pytest.raises(ValueError, match="weights_digest"):
        save_model(tmp_path / "m.idc", arrays, {"weights_digest": "f" * 64})
    assert not (tmp_path / "m.idc").exists()


def test_plain_state_dict_needs_explicit_permission(tmp_path: Path, caplog) -> None:
    model = build_model("group", seed=0)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelIntegrityError, match="allow_unverified"):
        load_model(path)
    arrays, meta = load_model(path, allow_unverified=True)
    assert meta is None and detect_norm(arrays) == "group"
    assert "UNVERIFIED" in caplog.text


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.idc"
    path.write_bytes(b"not a model at all")
    with pytest.raises(ModelIntegrityError, match="m.idc"):
        load_model(path, allow_unverified=True)


def test_detect_norm(arrays) -> None:
    assert detect_norm(arrays) == "batch"
    assert detect_norm(model_arrays(build_model("group", seed=0))) == "group"


def test_run_metadata_is_honest_about_epsilon_and_fingerprints() -> None:
    rows = [
        {
            "round": 1,
            "sites": {
                "a": {"dp": 1.0, "epsilon-total": 0.5},
                "b": {"dp": 0.0, "epsilon-total": 0.0},
            },
        },
        {"round": 2, "sites": {"a": {"dp": 1.0, "epsilon-total": 0.9}}},
    ]
    meta = run_metadata("run-x", 2, rows, LogHead(7, "ab" * 32))
    sites = {s["site"]: s for s in meta["sites"]}
    assert sites["a"]["epsilon"] == 0.9 and sites["a"]["rounds"] == 2
    assert sites["b"]["epsilon"] is None and sites["b"]["rounds"] == 1  # no DP is not eps 0
    assert all(s["fingerprint"] is None for s in sites.values()) and meta["fingerprint_note"]
    assert meta["audit"] == {"seq": 7, "hash": "ab" * 32, "entry": "run.finished"}
    assert run_metadata("run-x", 0, [], None)["audit"] is None


def test_coordinator_finish_writes_a_model_that_names_the_run_end(tmp_path: Path) -> None:
    from common import keys
    from common.audit import AuditLog
    from common.audit_format import entry_hash, parse_entry
    from common.config import RunConfig
    from server.coordinator import Coordinator, initial_arrays

    run = RunConfig(num_server_rounds=1)
    coord = Coordinator(run, tmp_path / "run", "run-1")
    key = keys.generate_key_pair(tmp_path / "c.key", tmp_path / "c.pub")
    coord.audit = AuditLog(tmp_path / "audit.jsonl", key, "coordinator")
    arrays = initial_arrays(run)
    row = {
        "round": 1,
        "train": {"train-loss": 0.7, "train-accuracy": 0.5},
        "evaluate": {"loss": 0.6, "balanced-accuracy": 0.5},
        "sites": {"h1": {"dp": 0.0, "epsilon-total": 0.0}},
    }
    coord.dir.commit_round(1, row, arrays, {})
    coord.finish()
    loaded, meta = load_model(tmp_path / "run" / "final" / "model.idc")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert meta is not None and meta["run_id"] == "run-1" and meta["rounds"] == 1
    assert meta["weights_digest"] == summary["final_digest"] == digest_update(arrays)
    assert meta["sites"] == [
        {
            "site": "h1",
            "rounds": 1,
            "last_round": 1,
            "dp": False,
            "epsilon": None,
            "fingerprint": None,
        }
    ]
    last = parse_entry((tmp_path / "audit.jsonl").read_bytes().splitlines(keepends=True)[-1])
    assert last["action"] == "run.finished"
    assert meta["audit"]["seq"] == last["seq"] and meta["audit"]["hash"] == entry_hash(last)
    coord.close()
