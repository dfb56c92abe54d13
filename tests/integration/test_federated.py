"""Real SuperLink and SuperNodes over TLS with node authentication, driven by the commands."""

from __future__ import annotations

import json
import re
import stat

import numpy as np
import pytest
import torch

import flowerctl
from common.audit_verify import cross_check, verify_log
from common.data import load_patches
from common.dataset import PatchDataset, make_loader
from common.keys import generate_key_pair, load_public_key, public_key_fingerprint
from common.model import build_model
from common.provenance import load_model
from common.rundir import RunDir
from common.training import evaluate
from flowerctl import list_nodes
from server.link import node_key_fingerprint
from simulation.synth import SynthSpec, synthesize
from tests.integration.federation import synth_sites, wait_for

pytestmark = pytest.mark.slow
# Group norm: no running statistics, so an early global model evaluates fairly.
FAST = [
    "local-epochs=2",
    "learning-rate=0.001",
    "batch-size=32",
    'norm="group"',
    # Long enough for honest sites on a loaded 2-core machine; a site that disappears is
    # noticed by the SuperLink (node offline) well before it, so the tests do not wait it out.
    "round-timeout=180",
]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folders = synth_sites(
        root, SynthSpec(patients=9, sites=3, patches_per_patient=(50, 70), seed=1)
    )
    synthesize(root / "heldout", SynthSpec(patients=4, patches_per_patient=(60, 60), seed=99))
    return folders, root / "heldout"


def balanced_accuracy(arrays, heldout):
    patches = load_patches(heldout)
    model = build_model("group")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    loader = make_loader(PatchDataset(patches.images, patches.labels), 256, False)
    return evaluate(model, loader, torch.device("cpu")).balanced_accuracy


def listed_keys(fed):
    """Key fingerprints of every node the SuperLink knows, in any state."""
    return {node_key_fingerprint(bytes(n.public_key)) for n in list_nodes(fed.connection())}


def rounds(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def mode(path) -> int:  # noqa: ANN001
    return stat.S_IMODE(path.stat().st_mode)


def start_with_outsiders(fed, folders) -> str:  # noqa: ANN001
    """hosp0-2 registered, an intruder never registered, and a stranger whose own key went
    in through the Control API under a real hospital's name (Flower accepts duplicate names);
    all four SuperNodes started. Returns the intruder's key fingerprint."""
    fed.init()
    for i in range(3):
        fed.add_site(f"hosp{i}")
    fed.add_site("intruder", register=False)
    stranger = fed.add_site("stranger", register=False)
    (stranger / "site.json").write_text(json.dumps({"site-name": "hosp0"}))
    fed.start_server()
    flowerctl.register_supernode(fed.connection(), stranger / "site.pub", "hosp0")
    for i in range(3):
        fed.start_site(f"hosp{i}", folders[i])
    fed.start_site("intruder", folders[0])
    fed.start_site("stranger", folders[2])
    fed.wait_sites_online(4)  # the three hospitals and the stranger
    return public_key_fingerprint(load_public_key(fed.root / "intruder" / "site.pub"))


def assert_owner_only(fed) -> None:  # noqa: ANN001
    """The state the running coordinator and sites leave on disk is owner-only."""
    assert mode(fed.coord) == 0o700 and mode(fed.coord / "superlink") == 0o700
    for path in (
        fed.coord / "superlink" / "superlink.db",
        fed.coord / "superlink.json",
        fed.coord / "audit" / "coordinator-audit.jsonl",
        fed.root / "hosp0" / "audit" / "site-audit.jsonl",
        fed.root / "hosp0" / "flwr-home" / "node-config.toml",
    ):
        assert mode(path) == 0o600, path
    assert mode(fed.root / "hosp0") == 0o700 and mode(fed.root / "hosp0" / "flwr-home") == 0o700


def assert_audit(fed) -> None:  # noqa: ANN001
    """Every log verifies; the good sites' sent updates are the ones received; no site paths."""
    coord_log = fed.coord / "audit" / "coordinator-audit.jsonl"
    coord_key = load_public_key(fed.coord / "coordinator.pub")
    assert verify_log(coord_log, coord_key).ok
    text = coord_log.read_text()
    assert str(fed.root) not in text and "site-audit" not in text  # no site paths
    assert "stranger" not in text
    for name in ("hosp0", "hosp1"):
        site_log = fed.root / name / "audit" / "site-audit.jsonl"
        key = load_public_key(fed.root / name / "site.pub")
        assert verify_log(site_log, key).ok
        report = cross_check(coord_log, coord_key, site_log, key, name)
        assert report.ok and report.matched == 2, report.problems
    verify = fed.cli("idc-server", "audit", "verify", str(coord_log), "--dir", str(fed.coord))
    assert verify.returncode == 0 and public_key_fingerprint(coord_key) in verify.stdout
    submitted = [json.loads(x) for x in text.splitlines() if '"run.submitted"' in x]
    started = [json.loads(x) for x in text.splitlines() if '"run.started"' in x]
    assert submitted[0]["details"]["run_id"] == started[0]["details"]["run_id"]
    assert submitted[0]["seq"] < started[0]["seq"]  # recorded once accepted, before it ran
    received = [json.loads(x) for x in text.splitlines() if '"update.received"' in x]
    bad = [e for e in received if e["object"] == "hosp2"]
    assert len(bad) == 2 and all(not e["details"]["signature_valid"] for e in bad)


def test_two_rounds_over_tls_with_registered_sites_only(fed, site_data):
    """Only registered keys train: an intruder is never admitted, a stranger registered under
    hosp0's name never sampled (for training or evaluation), hosp2's re-keyed updates refused."""
    folders, heldout = site_data
    intruder = start_with_outsiders(fed, folders)
    assert intruder not in listed_keys(fed)
    # hosp2 now signs its updates with a key the coordinator never saw: they must be refused
    (fed.root / "hosp2" / "site.key").unlink()
    (fed.root / "hosp2" / "site.pub").unlink()
    generate_key_pair(fed.root / "hosp2" / "site.key", fed.root / "hosp2" / "site.pub")
    res = fed.run(
        "--out", str(fed.root / "run"), "--rounds", "2", "--run-config", "min-sites=2", *FAST
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round 2:" in res.stdout
    run_dir = fed.root / "run"
    rows = rounds(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert sorted(row["sites"]) == ["hosp0", "hosp1"]
        assert [r["site"] for r in row["rejected"]] == ["hosp2"]
        assert "signature" in row["rejected"][0]["reason"]
        assert "intruder" not in json.dumps(row) and row["failures"] == []
    # the stranger's ClientApp never ran: no message reached it, so it never wrote a log
    assert not (fed.root / "stranger" / "audit" / "site-audit.jsonl").exists()
    assert_owner_only(fed)  # checked while everything runs
    assert f"final model: {RunDir(run_dir).final_model}" in res.stdout
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == ["model.idc"]
    assert (run_dir / "curves.png").is_file()
    before = balanced_accuracy(RunDir(run_dir).read_checkpoint(0), heldout)
    after = balanced_accuracy(load_model(RunDir(run_dir).final_model)[0], heldout)
    assert after > before, (before, after)
    # the decision threshold was chosen on the sites' validation histograms of the last round
    source = load_model(RunDir(run_dir).final_model)[1]["threshold_source"]
    chose = source.startswith("validation: ") or "every patch in one bin" in source
    assert chose and "round 2" in source, source
    # ... then once more, finer, on the band where the final model put them: every site
    # answered from the model it kept (no weights sent again), with counts only
    coord_entries = [
        json.loads(x)
        for x in (fed.coord / "audit" / "coordinator-audit.jsonl").read_text().splitlines()
    ]
    [refined] = [e for e in coord_entries if e["action"] == "threshold.refined"]
    assert refined["outcome"] == "ok" and refined["details"]["sites"] == ["hosp0", "hosp1", "hosp2"]
    final_digest = [e for e in coord_entries if e["action"] == "checkpoint.written"][-1]["details"][
        "digest"
    ]
    for name in ("hosp0", "hosp1", "hosp2"):
        site_log = [
            json.loads(x)
            for x in (fed.root / name / "audit" / "site-audit.jsonl").read_text().splitlines()
        ]
        [asked] = [
            e["details"]
            for e in site_log
            if e["action"] == "message.received" and e["details"]["action"] == "refine"
        ]
        assert asked["range"] == refined["details"]["range"] and asked["model_held"] == final_digest
        assert [e["details"]["round"] for e in site_log if e["action"] == "histograms.sent"] == [2]
    # the SuperLink never admitted the intruder: no node of its key, before or after the run
    assert intruder not in listed_keys(fed)
    assert_audit(fed)
    # each global model crossed the network once a round: round 2 trained from the model the
    # sites kept from round 1's evaluation, and the coordinator recorded whom it spared
    for name in ("hosp0", "hosp1"):
        site_log = (fed.root / name / "audit" / "site-audit.jsonl").read_text().splitlines()
        trains = [e for e in map(json.loads, site_log) if e["action"] == "message.received"]
        trains = [e["details"] for e in trains if e["details"]["action"] == "train"]
        assert ["model_held" in d for d in trains] == [False, True], trains
    coord_log = (fed.coord / "audit" / "coordinator-audit.jsonl").read_text().splitlines()
    started = [e for e in map(json.loads, coord_log) if e["action"] == "round.started"]
    assert [e["details"]["sites_holding_it"] for e in started] == [[], ["hosp0", "hosp1", "hosp2"]]
    assert started[1]["details"]["global_digest"] == trains[1]["model_held"]
    # the ServerApp's log, a file the coordinator's operators read: each line timed, no colours
    lines = (fed.coord / "logs" / "serverapp.log").read_text().splitlines()
    assert any("[ROUND 2/2]" in line for line in lines), lines[:20]
    assert not [x for x in lines if "HTTP Request" in x][:3]  # no line per request
    assert not [
        x
        for x in lines
        if "\x1b[" in x or not re.match(r"[A-Z]+ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", x)
    ][:3]


def test_a_site_then_the_coordinator_crash_and_the_run_resumes(fed, site_data):
    """Two crashes in one three-round run (one federation, where two once started one each).

    A site killed in round 2 does not stop the run; the coordinator killed after round 2
    does, and ``--resume`` completes round 3: no round lost, none repeated.
    """
    folders, _ = site_data
    server = fed.start_all({f"hosp{i}": folders[i] for i in range(3)})
    victim = fed.supernode_pid("hosp2")
    run_dir = fed.root / "run"
    proc = fed.spawn_run(
        "--out", str(run_dir), "--rounds", "3", "--run-config", "min-sites=2", *FAST
    )
    site_log = fed.root / "hosp2" / "audit" / "site-audit.jsonl"
    wait_for(
        lambda: site_log.is_file() and '"round":2' in site_log.read_text(),
        600,
        "hosp2 to receive round 2",
        [proc, fed.procs["hosp2"]],
    )
    fed.kill_group(victim)
    state = run_dir / "state.json"
    wait_for(
        lambda: state.is_file() and json.loads(state.read_text())["completed_round"] >= 2,
        600,
        "round 2 to complete without hosp2",
        [proc, server],
    )
    rows = rounds(run_dir)
    assert "hosp2" in rows[0]["sites"] and "hosp2" not in rows[1]["sites"]
    assert any(f["site"] == "hosp2" for f in rows[1]["failures"]), rows[1]["failures"]

    fed.kill_group(fed.superlink_pid())  # the coordinator crashes
    server.wait(30)
    # idc-server run gives up once the SuperLink has been gone for a minute
    assert proc.wait(300) != 0
    assert "unreachable" in fed.output("run")
    assert json.loads(state.read_text())["completed_round"] == 2  # round 3 never committed
    fed.start_server()
    fed.wait_sites_online(2)
    res = fed.run("--resume", str(run_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = rounds(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]  # none lost, none repeated
    assert sorted(rows[2]["sites"]) == ["hosp0", "hosp1"]
    assert json.loads(state.read_text())["completed_round"] == 3
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    final = RunDir(run_dir).read_checkpoint(3)
    assert all(np.isfinite(v).all() for v in final.values())
