"""What a hospital sets holds (issue 13): the cap, the per-site budget, the site's delta.

Each test plays a careless or hostile party against the real round code (client/private.py)
with a real site folder, real Opacus and the site's real signed audit log.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from PIL import Image

from client.private import RoundOutcome, train_round
from client.site import open_audit
from common import keys
from common.accounting import epsilon
from common.audit import AuditLog
from common.config import DEFAULT_MAX_EVALUATIONS, RunConfig, SiteConfig
from common.ledger import LedgerError
from common.model import build_model
from common.paths import SitePaths
from common.protocol import OK, REFUSED
from common.site_data import Site, model_arrays
from simulation.synth import SynthSpec, synthesize
from tests.conftest import node_config_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus's secure-RNG notice
DELTA = 1e-3  # below 1/train patches of the small site
DP_RUN = RunConfig(
    norm="group",
    batch_size=32,
    dp_enabled=True,
    dp_noise_multiplier=1.0,
    dp_delta=DELTA,
)


def _site_dir(root: Path, data: Path) -> SiteConfig:
    state = root / "state"
    state.mkdir(parents=True)
    keys.generate_key_pair(SitePaths(state).key, SitePaths(state).pub)
    shutil.copytree(data, root / "data")
    return SiteConfig(
        site_name="hosp-a",
        data_dir=root / "data",
        state_dir=state,
        cache_dir=root / "cache",
        max_epsilon=100.0,
        delta=DELTA,
    )


def _round(cfg: SiteConfig, run: RunConfig = DP_RUN, server_round: int = 1) -> RoundOutcome:
    site = Site.open(cfg, run.seed)
    arrays = model_arrays(build_model("group", seed=run.seed))
    with open_audit(cfg) as audit:
        return train_round(site, run, arrays, "run-1", server_round, audit)


def _audit(cfg: SiteConfig, action: str) -> list[dict]:
    path = SitePaths(cfg.state_dir).audit
    entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [e for e in entries if e["action"] == action]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteConfig, RoundOutcome]:
    """A small site (about 30 training patches) after one DP round: trained once per module."""
    root = tmp_path_factory.mktemp("site")
    synthesize(root / "synth", SynthSpec(patients=6, patches_per_patient=(6, 8), seed=3))
    (root / "synth" / "synth.json").unlink()
    cfg = _site_dir(root / "template", root / "synth")
    return cfg, _round(cfg)


def _copy(trained: tuple[SiteConfig, RoundOutcome], dest: Path) -> SiteConfig:
    """The trained site's folders, copied: each test edits its own."""
    cfg = trained[0]
    shutil.copytree(cfg.data_dir, dest / "data")
    shutil.copytree(cfg.state_dir, dest / "state", ignore=shutil.ignore_patterns("*.lock"))
    return replace(cfg, data_dir=dest / "data", state_dir=dest / "state", cache_dir=dest / "c")


@pytest.fixture
def cfg(trained: tuple[SiteConfig, RoundOutcome], tmp_path: Path) -> SiteConfig:
    return _copy(trained, tmp_path)


def _cap_for(cfg: SiteConfig, rounds: int) -> float:
    """A cap with room for ``rounds`` rounds like the first one, not one more."""
    first = _audit(cfg, "privacy.spent")[0]["details"]
    step = (first["noise_multiplier"], first["sample_rate"], first["steps"])
    low, high = (epsilon([step] * k, DELTA) for k in (rounds, rounds + 1))
    return (low + high) / 2


# -- 13.1: a site that set a cap trains only DP-SGD under its own cap ------------------------


def test_a_capped_site_refuses_a_round_without_dp(cfg: SiteConfig):
    plain = replace(DP_RUN, dp_enabled=False)  # the coordinator switched DP off
    outcome = _round(replace(cfg, max_epsilon=2.0), plain)
    assert outcome.status == REFUSED and outcome.arrays is None  # no weights leave
    assert "DP" in outcome.reason and "cap" in outcome.reason
    refused = _audit(cfg, "privacy.refused")
    assert len(refused) == 1 and refused[0]["details"]["reason"] == outcome.reason


def test_a_site_without_a_cap_still_trains_a_plain_round(cfg: SiteConfig):
    outcome = _round(
        replace(cfg, max_epsilon=float("inf"), delta=0.0), replace(DP_RUN, dp_enabled=False)
    )
    assert outcome.status == OK and outcome.arrays is not None


# -- 13.2: the budget follows the site, not its file listing ---------------------------------


def _add_empty_patch(folder: Path) -> None:
    patient = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    (patient / "0" / f"{patient.name}_idx5_x9999_y9999_class0.png").write_bytes(b"")


def _rename_patch(folder: Path) -> None:
    patch = sorted(folder.glob("*/0/*.png"))[0]
    patch.rename(patch.with_name(patch.name.replace("_idx5_x", "_idx5_x1")))


def _resave_uncompressed(folder: Path) -> None:
    patch = sorted(folder.glob("*/1/*.png"))[0]
    buf = io.BytesIO()
    Image.open(patch).save(buf, format="PNG", compress_level=0)  # same pixels, other bytes
    assert buf.getvalue() != patch.read_bytes()
    patch.write_bytes(buf.getvalue())


EDITS = {
    "an empty patch-like file": _add_empty_patch,
    "a renamed patch": _rename_patch,
    "a re-saved PNG": _resave_uncompressed,
}


@pytest.mark.parametrize("edit", [*EDITS, "a moved folder"])
def test_editing_the_folder_gives_no_fresh_budget(
    trained: tuple[SiteConfig, RoundOutcome], cfg: SiteConfig, tmp_path: Path, edit: str
):
    spent = trained[1].metrics.epsilon_total
    assert trained[1].status == OK and spent > 0
    capped = replace(cfg, max_epsilon=_cap_for(cfg, 1))  # room for one round, not two
    if edit == "a moved folder":
        capped = replace(capped, data_dir=cfg.data_dir.rename(tmp_path / "moved"))
    else:
        EDITS[edit](cfg.data_dir)
    second = _round(capped, server_round=2)
    assert second.status == REFUSED and second.arrays is None, edit
    assert second.metrics.epsilon_total == pytest.approx(spent, rel=1e-9)


def test_a_deleted_ledger_refuses_rounds_until_restored(cfg: SiteConfig, tmp_path: Path):
    ledger = SitePaths(cfg.state_dir).ledger
    backup = tmp_path / "backup.json"
    shutil.copy(ledger, backup)
    ledger.unlink()
    refused = _round(cfg, server_round=2)
    assert refused.status == REFUSED and refused.arrays is None
    assert "ledger" in refused.reason and "restore" in refused.reason
    assert str(cfg.state_dir) not in refused.reason  # the coordinator learns no site paths
    assert not ledger.exists()  # the refusal does not plant a fresh, empty ledger
    ledger.write_text(json.dumps({**json.loads(backup.read_text()), "rounds": []}))
    assert _round(cfg, server_round=3).status == REFUSED  # emptied: the same
    shutil.copy(backup, ledger)
    assert _round(cfg, server_round=4).status == OK


def test_two_concurrent_rounds_cannot_both_pass_the_cap(cfg: SiteConfig):
    capped = replace(cfg, max_epsilon=_cap_for(cfg, 2))  # room for one more round, not two
    outcomes: list[RoundOutcome] = []
    errors: list[BaseException] = []

    def one(server_round: int) -> None:
        try:
            site = Site.open(capped, DP_RUN.seed)
            arrays = model_arrays(build_model("group", seed=DP_RUN.seed))
            # Two runs at once: each its own audit file (the site's log takes one writer).
            log_path = capped.state_dir / f"audit-{server_round}.jsonl"
            key = keys.load_private_key(SitePaths(capped.state_dir).key)
            with AuditLog(log_path, key, actor="hosp-a") as audit:
                outcomes.append(train_round(site, DP_RUN, arrays, "run-x", server_round, audit))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    twins = [threading.Thread(target=one, args=(r,)) for r in (2, 3)]
    for t in twins:
        t.start()
    for t in twins:
        t.join()
    assert not errors, errors
    assert sorted(o.status for o in outcomes) == [OK, REFUSED]


# -- 13.3: the site's delta is the site's -----------------------------------------------------


def test_a_cap_needs_the_sites_own_delta():
    node = {"site-name": "a", "data-dir": "/d", "state-dir": "/s", "max-epsilon": 2.0}
    with pytest.raises(ValueError, match="delta"):
        SiteConfig.from_node_config(node)
    assert SiteConfig.from_node_config({**node, "delta": 1e-5}).delta == 1e-5


def test_the_run_cannot_change_what_the_cap_means(cfg: SiteConfig):
    loose = replace(DP_RUN, dp_delta=0.02, dp_accountant="prv")  # a generous coordinator
    outcome = _round(cfg, loose, server_round=2)
    spent = [e["details"] for e in _audit(cfg, "privacy.spent")]
    assert [s["delta"] for s in spent] == [DELTA, DELTA] and outcome.status == OK
    reference = RDPAccountant()  # what the site's cap is checked with
    reference.history = [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in spent]
    assert outcome.metrics.epsilon_total == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)


# -- 13.7: a DP round sends nothing the accounting does not cover ----------------------------


def test_a_dp_reply_carries_no_training_or_validation_metrics(
    trained: tuple[SiteConfig, RoundOutcome],
):
    record = trained[1].metrics.to_record()
    assert not [k for k in record if k.startswith(("train-", "val-"))], record
    assert record["dp"] == 1.0 and record["epsilon-total"] > 0


# -- the ClientApp handler and the site's commands ------------------------------------------


def test_the_clientapp_sends_no_weights_for_a_plain_round_to_a_capped_site(cfg: SiteConfig):
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from client.app import train
    from common import protocol
    from common.packing import pack

    (cfg.state_dir / "site.json").write_text(json.dumps({"site-name": cfg.site_name}))
    node = node_config_of(cfg, **{"max-epsilon": 2.0, "delta": DELTA})
    run = replace(DP_RUN, dp_enabled=False).to_run_config()
    arrays = model_arrays(build_model("group", seed=DP_RUN.seed))
    packed, layout = pack(arrays)
    content = RecordDict(
        {
            protocol.ARRAYS: packed,
            protocol.LAYOUT: layout,
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1}),
        }
    )
    # As the SuperNode hands it over: metadata set by the SuperLink (run 7, to node 1).
    meta = Metadata(7, "m1", 0, 1, "", "", time.time(), 600.0, "train", 1, 2)
    msg = Message(content, metadata=meta)
    reply = train(msg, Context(7, 1, node, RecordDict(), run))
    assert not reply.content.array_records  # no weights leave the site
    site = reply.content.config_records[protocol.SITE]
    assert site[protocol.STATUS] == protocol.REFUSED and site[protocol.SITE_NAME] == "hosp-a"
    assert "dp.enabled=false" in str(site[protocol.REASON])
    assert not _audit(cfg, "update.sent") and len(_audit(cfg, "privacy.refused")) == 1


def test_idc_client_privacy_reports_one_budget_and_refuses_a_lost_ledger(
    cfg: SiteConfig, capsys: pytest.CaptureFixture[str]
):
    from client.cli import main

    assert main(["privacy", "--dir", str(cfg.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "one budget for the whole site" in out and "run-1" in out and "one 50x50 patch" in out
    (SitePaths(cfg.state_dir).ledger).unlink()
    assert main(["privacy", "--dir", str(cfg.state_dir)]) == 3  # EXIT_REFUSED: fails closed
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "restore the ledger from a backup" in err


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--max-epsilon", "2"], "--max-epsilon needs --delta"),
        (["--max-epsilon", "2", "--delta", "0.5"], "--delta 0.5 must be in"),
        (["--max-epsilon", "2", "--delta", "1e-3"], "restore the ledger"),  # ledger deleted
        (["--max-evaluations", "0"], "--max-evaluations must be at least 1"),
    ],
)
def test_idc_client_start_refuses_a_cap_it_cannot_hold(cfg: SiteConfig, flags, match: str):  # noqa: ANN001
    from client.cli import build_parser
    from client.runner import check_privacy_flags

    (SitePaths(cfg.state_dir).ledger).unlink()
    argv = ["start", "--dir", str(cfg.state_dir), "--server", "x:1", "--data", "d", *flags]
    with pytest.raises((ValueError, LedgerError), match=match):
        check_privacy_flags(build_parser().parse_args(argv), 40)


def test_idc_client_start_hands_the_sites_cap_on_evaluations_to_its_clientapp(tmp_path: Path):
    import tomllib

    import tomli_w

    from client.cli import build_parser
    from client.runner import node_config

    argv = ["start", "--dir", str(tmp_path), "--server", "x:1", "--data", "d"]
    for flags, cap in (([], DEFAULT_MAX_EVALUATIONS), (["--max-evaluations", "12"], 12)):
        node = node_config(build_parser().parse_args([*argv, *flags]), "st-mary", tmp_path / "c")
        # as flowerctl writes node-config.toml and the ClientApp reads it back
        assert (
            SiteConfig.from_node_config(tomllib.loads(tomli_w.dumps(node))).max_evaluations == cap
        )


def test_the_per_round_epsilon_key_says_so():
    assert RunConfig.from_run_config({"dp.epsilon-per-round": 0.5}).dp_epsilon_per_round == 0.5
    with pytest.raises(ValueError, match="renamed 'dp.epsilon-per-round'"):
        RunConfig.from_run_config({"dp.target-epsilon": 0.5})


def test_a_real_sites_dp_noise_is_never_the_runs_to_choose(cfg: SiteConfig, tmp_path: Path):
    """Same run, seed, round and data: a real site's two models differ (secure noise).

    Only a virtual site of ``idc-sim`` seeds its noise, from the run's seed, its name and the
    round, so that an experiment repeats; a node config that names a data folder (every real
    site's) is never one, whatever the coordinator's run config says.
    """
    import numpy as np

    from client.private import noise_seed

    def weights(site: SiteConfig, name: str) -> dict:
        outcome = _round(_copy((site, None), tmp_path / name))  # type: ignore[arg-type]
        assert outcome.status == OK and outcome.arrays is not None
        return outcome.arrays

    def same(a: dict, b: dict) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    assert not same(weights(cfg, "real-1"), weights(cfg, "real-2"))
    simulated = replace(cfg, simulated=True)
    assert same(weights(simulated, "sim-1"), weights(simulated, "sim-2"))
    # the seed differs by site, round and run seed; a real site has none whatever the run
    seeds = {
        noise_seed(replace(simulated, site_name=name), replace(DP_RUN, seed=s), r)
        for name in ("site-000", "site-001")
        for s in (0, 1)
        for r in (1, 2)
    }
    assert len(seeds) == 8 and None not in seeds
    assert noise_seed(cfg, replace(DP_RUN, seed=0), 1) is None
    # a node config naming a data folder is a real site, even in a run that names virtual sites
    node = node_config_of(cfg, **{"partition-id": 0})
    run = replace(DP_RUN, sim_sites_dir=str(tmp_path / "sites"))
    assert not SiteConfig.from_context(node, run).simulated
    virtual = SiteConfig.from_context({"partition-id": 0}, run)
    assert virtual.simulated and virtual.site_name == "site-000"
