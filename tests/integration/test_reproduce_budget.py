"""idc-sim reproduce --max-minutes inside a row: a run that would start late (a DP point, a
centralized candidate) is not run and the report names it, instead of the row overrunning the
budget by whole runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from common.metrics import ACCURACY
from common.paths import MODEL_FILE
from simulation.report import fmt
from simulation.reproduce import NOT_REACHED, Request, reproduce
from simulation.scoring import AT_CHOSEN
from simulation.synth import SynthSpec, synthesize
from tests.integration.test_reproduce import TINY, _line

pytestmark = pytest.mark.slow

TWO_EPSILONS = replace(TINY, dp_epsilons=(8.0, 3.0))  # the DP row: two points to stop between
# ... and two recipes to choose between, on validation patients, at epsilon 8
TWO_RECIPES = replace(
    TWO_EPSILONS,
    dp_candidates=(
        {"batch-size": 32, "learning-rate": 1e-2},
        {"batch-size": 16, "learning-rate": 3e-3},
    ),
)


def spent_by_one_run(folder: Path, artefact: str, runs: int = 1) -> Callable[[], float]:
    """A clock that stands still until ``runs`` runs have written ``artefact`` under
    ``folder``, then jumps two minutes: --max-minutes 1 is spent by them on any machine."""

    def clock() -> float:
        return 120.0 if len(list(folder.rglob(artefact))) >= runs else 0.0

    return clock


def _data(tmp_path: Path) -> Path:
    synthesize(tmp_path / "data", SynthSpec(patients=9, patches_per_patient=(16, 24), seed=3))
    return tmp_path / "data"


def test_the_dp_sweep_stops_between_epsilons_and_names_what_it_skipped(
    tmp_path: Path, one_thread: None
) -> None:
    out = tmp_path / "out"
    req = Request(_data(tmp_path), out, TWO_RECIPES, seeds=(0,), rows=("dp",), max_minutes=1)
    said: list[str] = []
    reproduce(req, say=said.append, clock=spent_by_one_run(out / "dp", MODEL_FILE, runs=2))

    row = json.loads((out / "results.json").read_text())["rows"]["dp"]
    paper = row["models"]["paper"]
    # both recipes ran at epsilon 8; the one chosen on validation patients is the row's recipe
    tried = paper["candidates"]
    assert [(t["candidate"], t["epsilon"], t["seed"]) for t in tried] == [(0, 8.0, 0), (1, 8.0, 0)]
    for t in tried:
        assert t["val_balanced_accuracy"] == t["point"][AT_CHOSEN]["validation_balanced_accuracy"]
        assert t["point"]["run"].startswith(str(out / "dp" / "paper-candidates"))
    scores = [t["val_balanced_accuracy"] for t in tried]
    chosen = paper["chosen"]
    assert scores[chosen] == max(scores)
    batch = TWO_RECIPES.dp_candidates[chosen]["batch-size"]
    assert paper["recipe"]["applied"]["batch-size"] == batch
    # the chosen run is the sweep's point at epsilon 8: taken over, not run again
    assert paper["points"] == [tried[chosen]["point"]]
    assert not (out / "dp" / "paper" / "runs" / "eps-8-seed-0").exists()
    assert [(p["epsilon"], p["seed"]) for p in paper["points"]] == [(8.0, 0)]
    assert paper["not_run"] == ["eps-3-seed-0"]
    assert not (out / "dp" / "paper" / "runs" / "eps-3-seed-0").exists()
    assert "paper eps-3-seed-0" in row["not_run"]  # a later model is not started either
    assert [s["epsilon"] for s in paper["summary"]] == [8.0]
    # the DP point is scored at 0.5 and at its own run's validation-chosen threshold
    at, summary = paper["points"][0][AT_CHOSEN], paper["summary"][0]
    assert at["threshold_source"].startswith(("coordinator", "validation, exact"))
    assert summary[AT_CHOSEN]["thresholds"] == [at["threshold"]]
    assert summary[AT_CHOSEN]["balanced_accuracy"] == at["balanced_accuracy"]
    report = (out / "report.md").read_text()
    assert f"| paper, at the validation-chosen threshold t={at['threshold']:.3g} |" in report
    assert "**Not run, --max-minutes reached: paper eps-3-seed-0" in report
    assert f"- paper: candidate {chosen} chosen at epsilon 8, seed 0, by validation" in report
    # the row's DP step time, measured at its batch against a plain step, is a target
    speed, batch = paper["step_time"], paper["recipe"]["applied"]["batch-size"]  # the DP recipe's
    assert (speed["model"], speed["batch"], speed["grad_sample_mode"]) == ("paper", batch, "hooks")
    assert speed["ratio"] == pytest.approx(speed["dp_s"] / speed["plain_s"])
    line = _line(report, f"| 4 | DP-SGD paper step time / plain step at batch {batch} |")
    assert f"| {fmt(speed['ratio'])} | {'met' if speed['ratio'] <= 2 else 'NOT met'} |" in line
    assert f"| paper | {batch} | hooks | {speed['plain_s']:.3f} | {speed['dp_s']:.3f} |" in report
    assert any("epsilon 3, seed 0: not run" in line for line in said), said


def test_the_central_row_stops_between_candidates(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "out"
    sched = replace(TWO_EPSILONS, candidates=2)
    req = Request(_data(tmp_path), out, sched, seeds=(0,), rows=("central",), max_minutes=1)
    reproduce(req, say=lambda _: None, clock=spent_by_one_run(out / "central", "metrics.json"))

    row = json.loads((out / "results.json").read_text())["rows"]["central"]
    assert [c["candidate"] for c in row["candidates"]] == [0] and row["chosen"] == 0
    assert row["not_run"] == ["candidate-1"]
    assert not (out / "central" / "candidate-1").exists()
    report = (out / "report.md").read_text()
    assert "**Not run, --max-minutes reached: candidate-1.**" in report


class Stopped(BaseException):
    """What a job's time limit does to the command: it ends it from outside, mid-row."""


def test_a_command_stopped_mid_run_leaves_the_rows_it_finished(
    tmp_path: Path, one_thread: None
) -> None:
    out = tmp_path / "out"
    req = Request(_data(tmp_path), out, TINY, seeds=(0,), rows=("paper", "central"))

    def say(line: str) -> None:
        if line.startswith("[2/2] central: starting"):
            raise Stopped

    with pytest.raises(Stopped):
        reproduce(req, say=say)

    doc = json.loads((out / "results.json").read_text())
    paper = json.loads((out / "paper" / "run" / "metrics.json").read_text())["test"]
    assert doc["finished"] is False
    assert doc["rows"]["paper"]["test"][ACCURACY] == paper[ACCURACY]
    assert doc["rows"]["central"] == NOT_REACHED
    verdicts = {t["row"]: t["verdict"] for t in doc["targets"]}
    assert verdicts["2"] == "not run" and verdicts["1"] in ("met", "NOT met")
    report = (out / "report.md").read_text()
    assert "**Partial report**" in report
    assert f"_skipped: {NOT_REACHED['skipped']}_" in report
    assert (out / "figures" / "paper-curves.png").read_bytes()[:4] == b"\x89PNG"
