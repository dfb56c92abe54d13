"""idc-sim reproduce on tiny synthetic patients: the report is written, well formed, and its
numbers are those of results.json, which are those the runs wrote themselves."""

from __future__ import annotations

import json

import pytest
import torch

from common.metrics import ACCURACY, AUC, BALANCED_ACCURACY, F1
from common.privacy import PRIVACY_UNIT
from simulation.cli import main as sim_main
from simulation.report import fmt
from simulation.reproduce import Request, Schedule, reproduce
from simulation.synth import SynthSpec, synthesize

pytestmark = pytest.mark.slow

TINY = Schedule(
    name="tiny",
    patients=None,
    paper_epochs=1,
    rounds=1,
    local_epochs=1,
    site_counts=(3,),
    skews=(),
    local_only=(),
    dp_epsilons=(8.0,),
    dp_rounds=1,
    candidates=1,
    batch_size=16,
)


def _line(report: str, start: str) -> str:
    lines = [ln for ln in report.splitlines() if ln.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


def _cells(m: dict) -> str:
    return " | ".join(fmt(m[k]) for k in (ACCURACY, BALANCED_ACCURACY, F1, AUC))


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

    # report.md shows exactly those numbers
    report = (out / "report.md").read_text()
    assert _line(report, "| paper protocol, test patches").endswith(_cells(paper) + " |")
    assert _line(report, "| candidate 0 (chosen)").endswith(_cells(central) + " |")
    assert _cells(fed) in _line(report, "| iid-3: FedAvg")
    gap = fed[BALANCED_ACCURACY] - compare["centralized"]["union"][BALANCED_ACCURACY]
    assert f"gap {100 * gap:+.1f} BAC points" in report
    target = _line(report, "| 1 | paper protocol, test accuracy")
    assert fmt(paper[ACCURACY]) in target and ("NOT met" in target) == (paper[ACCURACY] < 0.9075)
    assert _line(report, "| 4 | DP-SGD minus FedAvg iid").endswith("not run |")
    assert _line(report, "| 4 | DP-SGD step time").endswith("(benchmarks/dp_overhead.py) |")
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
