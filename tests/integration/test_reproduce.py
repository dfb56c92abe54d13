"""idc-sim reproduce on tiny synthetic patients: the report is written, well formed, and its
numbers are those of results.json, which are those the runs wrote themselves."""

from __future__ import annotations

import json

import pytest
import torch

from common.metrics import ACCURACY, AUC, BALANCED_ACCURACY, F1, PER_PATIENT
from common.privacy import PRIVACY_UNIT
from simulation.cli import main as sim_main
from simulation.report import fmt
from simulation.reproduce import Request, Schedule, reproduce
from simulation.reproduce_rows import chosen_t
from simulation.scoring import AT_CHOSEN
from simulation.synth import SynthSpec, synthesize

pytestmark = pytest.mark.slow

TINY = Schedule(
    name="tiny",
    patients=None,
    paper_epochs=2,
    rounds=1,
    local_epochs=1,
    site_counts=(3,),
    skews=(),
    local_only=(),
    dp_epsilons=(8.0,),
    dp_rounds=1,
    candidates=1,
    batch_size=16,
    speed_steps=2,
)


def _line(report: str, start: str) -> str:
    lines = [ln for ln in report.splitlines() if ln.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


def _cells(m: dict) -> str:
    return " | ".join(fmt(m[k]) for k in (ACCURACY, BALANCED_ACCURACY, F1, AUC, *PER_PATIENT))


def test_reproduce_writes_a_report_whose_numbers_come_from_the_runs(tmp_path, one_thread):
    data = tmp_path / "data"
    summary = synthesize(data, SynthSpec(patients=9, patches_per_patient=(16, 24), seed=3))
    out = tmp_path / "out"
    req = Request(data, out, TINY, seeds=(0,), rows=("paper", "central", "fedavg"))
    returned = reproduce(req, say=lambda _: None)

    doc = json.loads((out / "results.json").read_text())
    assert doc["label"] == "TINY" and doc["data"]["patches"] == summary.patches
    assert doc["data"]["patients"] == 9 and len(doc["data"]["digest"]) == 64
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["finished"] is True  # the last write: no row says "not reached"
    assert "Partial report" not in (out / "report.md").read_text()
    for name in (
        "paper-curves.png",
        "paper-confusion.png",
        "paper-examples.png",
        "fedavg-rounds.png",
    ):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG", name

    # results.json holds what each runner wrote in its own folder
    paper = json.loads((out / "paper" / "run" / "metrics.json").read_text())["test"]
    central = json.loads((out / "central" / "candidate-0" / "metrics.json").read_text())["test"]
    compare = json.loads((out / "fedavg" / "iid-3" / "results.json").read_text())
    fed = compare["fedavg"]["fedavg"]["union"]
    assert doc["rows"]["paper"]["test"][ACCURACY] == paper[ACCURACY]
    assert doc["rows"]["central"]["test"][AUC] == central[AUC]
    run = doc["rows"]["fedavg"]["runs"]["iid-3"]
    assert run["fedavg"]["fedavg"]["union"][BALANCED_ACCURACY] == fed[BALANCED_ACCURACY]
    assert returned["rows"]["paper"]["test"][ACCURACY] == paper[ACCURACY]

    # every row is scored at 0.5 and at a threshold chosen on its own validation patients
    for scored in (paper, central, compare["centralized"]["union"]):
        assert scored[AT_CHOSEN]["threshold_source"].startswith("validation, exact: ")
    summary = json.loads((out / "fedavg" / "iid-3" / "fedavg" / "run" / "summary.json").read_text())
    fed_t = fed[AT_CHOSEN]
    if fed_t["threshold_source"].startswith("coordinator"):  # the run's own choice, as deployed
        assert fed_t["threshold"] == summary["threshold"]["threshold"]
    else:  # its histograms could not resolve the model: the sites' pooled validation
        assert "pooled validation" in fed_t["threshold_source"]
    assert doc["rows"]["central"]["test"][AT_CHOSEN] == central[AT_CHOSEN]

    # report.md shows exactly those numbers, both of each
    report = (out / "report.md").read_text()
    row = doc["rows"]["paper"]  # the paper's every epoch runs; the best on validation is kept
    assert row["config"]["patience"] == row["config"]["epochs"] == len(row["history"])
    best = int(min(row["history"], key=lambda r: r["val_loss"])["epoch"])
    assert f"the model of epoch {best} kept (lowest\nvalidation loss)" in report
    for start, m in (
        ("| paper protocol, test patches", paper),
        ("| candidate 0 (chosen)", central),
    ):
        assert _line(report, f"{start}, at 0.5 |").endswith(_cells(m) + " |")
        chosen = _line(report, f"{start}, at the validation-chosen threshold {chosen_t(m)} |")
        assert chosen.endswith(_cells(m[AT_CHOSEN]) + " |")
    assert _cells(fed) in _line(report, "| iid-3: FedAvg, at 0.5")
    assert _cells(fed_t) in _line(
        report, f"| iid-3: FedAvg, at the validation-chosen threshold {chosen_t(fed)}"
    )
    pooled = compare["centralized"]["union"]
    gap = fed[BALANCED_ACCURACY] - pooled[BALANCED_ACCURACY]
    assert f"at 0.5 (gap {100 * gap:+.1f} BAC points)" in report
    gap_t = fed_t[BALANCED_ACCURACY] - pooled[AT_CHOSEN][BALANCED_ACCURACY]
    assert f"{chosen_t(fed)} (gap {100 * gap_t:+.1f} BAC points)" in report

    # the targets use the numbers at the validation-chosen threshold, and say so
    acc = paper[AT_CHOSEN][ACCURACY]
    target = _line(report, "| 1 | paper protocol, test accuracy at the validation-chosen")
    assert fmt(acc) in target and ("NOT met" in target) == (acc < 0.9075)
    by_row = {t["what"]: t["measured"] for t in doc["targets"]}
    key = "centralized patient split, test balanced_accuracy at the validation-chosen threshold"
    assert by_row[key] == central[AT_CHOSEN][BALANCED_ACCURACY]
    fed_key = (
        "FedAvg iid-3 minus pooled on the same patients, BAC at the validation-chosen threshold"
    )
    assert by_row[fed_key] == pytest.approx(gap_t)
    assert _line(report, "| 4 | DP-SGD minus FedAvg iid").endswith("not run |")
    assert _line(report, "| 4 | DP-SGD step time").endswith("| not run |")
    assert "## 4. DP-SGD per site\n\n_not requested_" in report
    assert PRIVACY_UNIT in report and "puts patches of one patient on both sides" in report
    assert str(data) in report and doc["data"]["digest"] in report


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_bad_data_is_one_line_and_nonzero(tmp_path, capsys, make):
    data = tmp_path / "d"
    if make == "empty":
        data.mkdir()
    elif make == "file":
        data.write_text("x")
    code = sim_main(["reproduce", "--data", str(data), "--out", str(tmp_path / "o"), "--quick"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "--data" in err and str(data) in err and "Traceback" not in err
