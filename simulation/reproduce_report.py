"""The reproduction's report: results.json, report.md and figures/, every number from the runs.

The report is written from the results dictionary alone (no number is typed here): the
targets table (target, measured, met / NOT met) is derived from it and stored in it before
``results.json`` is written, so report.md, results.json and the runs agree. Every report
states the machine, the data (path, counts, digest), the schedule, the seeds and the privacy
unit.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common.metrics import BALANCED_ACCURACY  # noqa: E402
from common.privacy import PRIVACY_UNIT  # noqa: E402
from simulation.report import fmt, md_table, write_json  # noqa: E402
from simulation.reproduce_rows import (  # noqa: E402
    HEAD,
    THRESHOLDS,
    both_rows,
    chosen_t,
    confusion_md,
)
from simulation.reproduce_targets import targets  # noqa: E402
from simulation.scoring import AT_CHOSEN  # noqa: E402

PAPER_FIGURES = ("curves.png", "confusion.png", "confusion-chosen.png", "examples.png")
BOTH_SIDES = (
    "**This protocol puts patches of one patient on both sides**: the split is by patch, "
    "so the test set shares patients (and their slides' stain and tissue) with training. "
    "Its accuracy is not a result on new patients; row 2 is."
)
PATIENT_MEANING = (
    "For a patient: every number below is protected per patch. A patient with k patches in a "
    "site's training data is covered only by group privacy, about k times epsilon; with "
    "hundreds of patches per patient that is no meaningful patient-level guarantee."
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    """The device the runs used: GPU name or CPU model and cores, torch version."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": "cuda" if gpu else "cpu",
        "gpu": gpu,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _status(row: Mapping[str, Any] | None) -> str | None:
    if row is None:
        return "not requested"
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"FAILED: {row['error']}"
    return None


def _best_epoch(history: list[Mapping[str, float]]) -> int:
    """The epoch the loop restores: the first of lowest validation loss."""
    return int(min(history, key=lambda r: r["val_loss"])["epoch"])


def _paper(row: Mapping[str, Any], out: Path) -> str:
    test, sizes = row["test"], row["split_sizes"]
    table = md_table(["", *HEAD], both_rows("paper protocol, test patches", test))
    for name in PAPER_FIGURES:
        shutil.copyfile(Path(row["folder"]) / name, out / "figures" / f"paper-{name}")
    return f"""{BOTH_SIDES}

Balanced set: {row["balanced"]["per_class"]} patches per class; random patch split, seed
{row["seed"]}: {sizes["train"]} train, {sizes["val"]} validation, {sizes["test"]} test patches;
{len(row["history"])} epoch(s) run of {row["config"]["epochs"]} (patience
{row["config"]["patience"]}), the model of epoch {_best_epoch(row["history"])} kept (lowest
validation loss).

{table}

Confusion matrix on the test patches (counts and % of the true class), at 0.5:

{confusion_md(test["confusion"])}

and at the validation-chosen threshold {chosen_t(test)}:

{confusion_md(test[AT_CHOSEN]["confusion"])}

![curves](figures/paper-curves.png) ![confusion](figures/paper-confusion.png)
![confusion at the chosen threshold](figures/paper-confusion-chosen.png)
![examples: right and wrong](figures/paper-examples.png)
"""


def _central(row: Mapping[str, Any]) -> str:
    rows = []
    for c in row["candidates"]:
        applied = ", ".join(f"{k}={v}" for k, v in c["recipe"]["applied"].items())
        mark = " (chosen)" if c["candidate"] == row["chosen"] else ""
        sizes = c["split_sizes"]
        extra = (
            applied,
            f"{sizes['train']}/{sizes['val']}/{sizes['test']}",
            fmt(c["val_balanced_accuracy"]),
        )
        rows += both_rows(f"candidate {c['candidate']}{mark}", c["test"], extra)
    header = ["", "recipe applied", "train/val/test patches", "val. BAC at its t", *HEAD]
    return f"""{_skipped_md(row)}Patients split once by seed {row["seed"]} into
train/validation/test (60/10/30 of the patients and of each class's patches: stratified, so
validation is as IDC-rich as the cohort). Each candidate's test patients were scored once; the
chosen one has the best validation balanced accuracy (its lowest-validation-loss epoch, at
its own validation-chosen threshold); the test played no part in choosing.
Rows 3 and 4 split patients per site, so each of their comparisons trains its own pooled
baseline on the same sites' patients and scores it on the same test patients as FedAvg.

{md_table(header, rows)}
"""


def _skipped_md(row: Mapping[str, Any]) -> str:
    if not row.get("not_run"):
        return ""
    return f"**Not run, --max-minutes reached: {', '.join(row['not_run'])}.**\n\n"


def _fedavg(row: Mapping[str, Any], out: Path) -> str:
    rows = []
    for name, run in row["runs"].items():
        fed = next(iter(run["fedavg"].values()))
        cen, loc = run["centralized"]["union"], run.get("local_only")
        rows += both_rows(f"{name}: pooled, same patients", cen)
        rows += both_rows(f"{name}: FedAvg", fed["union"], ref=cen)
        if loc:
            rows += both_rows(f"{name}: local-only, mean ± sd", loc["union"])
    _plot_rounds(row, out / "figures" / "fedavg-rounds.png")
    applied = ", ".join(f"{k}={v}" for k, v in row["recipe"]["applied"].items()) or "none"
    return f"""{_skipped_md(row)}Each partition is its own comparison: FedAvg and a pooled
baseline trained for the same total local epochs on the same training patients, scored on
the union of the sites' own test patients (per-site tables and curves in
`fedavg/NAME/report.md`, the ServerApp's rounds in `fedavg/NAME/fedavg/run/`). Recipe
overrides sent to the ServerApp: {applied}; not accepted by this checkout:
{row["recipe"]["not_accepted_here"] or "none"}.

{md_table(["model", *HEAD], rows)}

![balanced accuracy per round](figures/fedavg-rounds.png)
"""


def _plot_rounds(row: Mapping[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in row["runs"].items():
        curve = next(iter(run["fedavg"].values()))["curve"]
        ax.plot(
            [c["epoch"] for c in curve], [c[BALANCED_ACCURACY] for c in curve], "o-", label=name
        )
    ax.set(xlabel="local epochs (rounds x local epochs)", ylabel="balanced accuracy, union test")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _dp(row: Mapping[str, Any], out: Path) -> str:
    rows = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, res in row["models"].items():
        summ = res["summary"]
        for s in summ:
            extra = (
                f"{s['epsilon']:g}",
                f"{s['noise_multiplier']:.3f}",
                fmt(s["epsilon_spent_max"]),
            )
            rows += both_rows(model, s, extra)
        eps = [s["epsilon"] for s in summ]
        ax.plot(eps, [s[BALANCED_ACCURACY] for s in summ], "o-", label=f"{model}, at 0.5")
        at = [s[AT_CHOSEN][BALANCED_ACCURACY] for s in summ if AT_CHOSEN in s]
        if len(at) == len(eps):
            ax.plot(eps, at, "s--", label=f"{model}, at the validation-chosen threshold")
    ax.set(xlabel="total epsilon per site (delta 1e-5)", ylabel="balanced accuracy", xscale="log")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "figures" / "dp-epsilon.png", dpi=100)
    plt.close(fig)
    header = ["model", "epsilon", "noise", "max epsilon spent", *HEAD]
    recipes = "; ".join(
        f"{model}: " + ", ".join(f"{k}={v}" for k, v in res["recipe"]["applied"].items())
        for model, res in row["models"].items()
    )
    return f"""{_skipped_md(row)}Sample-level DP-SGD at each of {row["sites"]} iid sites; the
noise is set offline so each site's total epsilon over the whole run stays within the budget (delta
{row["delta"]:g}, clipping norm {row["clip"]:g}). Mean ± sd over seeds {row["seeds"]} (each
seed: its own site splits, init, sampling and noise; a real site's noise is never seeded).
Recipe overrides sent: {recipes}.
{_dp_choice_md(row)}
{md_table(header, rows)}

![balanced accuracy against epsilon](figures/dp-epsilon.png)

{_step_times_md(row)}"""


def _dp_choice_md(row: Mapping[str, Any]) -> str:
    """The DP recipes each model chose among on validation patients, when it had a choice."""
    lines = []
    for model, res in row["models"].items():
        tried = res.get("candidates") or []
        if not tried:
            continue
        cells = ", ".join(
            f"candidate {t['candidate']} ("
            + ", ".join(f"{k}={v}" for k, v in t["recipe"]["applied"].items() if k != "model")
            + f") {fmt(t['val_balanced_accuracy'])}"
            for t in tried
        )
        eps, seed = tried[0]["epsilon"], tried[0]["seed"]
        lines.append(
            f"- {model}: candidate {res['chosen']} chosen at epsilon {eps:g}, seed {seed}, by "
            f"validation balanced accuracy at the coordinator's threshold: {cells}"
        )
    if not lines:
        return ""
    return (
        "\nChosen on the sites' validation patients only; the chosen run is the sweep's point "
        "at that epsilon and seed. The choice reads models trained on the sites' patches, and "
        "its own privacy cost is not counted in the epsilons below.\n\n" + "\n".join(lines) + "\n"
    )


def _step_times_md(row: Mapping[str, Any]) -> str:
    speeds = [(m, r["step_time"]) for m, r in row["models"].items() if "step_time" in r]
    if not speeds:
        return ""
    cells = [
        [m, str(s["batch"]), s["grad_sample_mode"], f"{s['plain_s']:.3f}", f"{s['dp_s']:.3f}"]
        + [f"{s['ratio']:.2f}"]
        for m, s in speeds
    ]
    first = speeds[0][1]
    return f"""Step time at the row's batch, on this machine ({first["threads"]} torch thread(s)): a
plain step and a DP-SGD step (per-sample gradients, clipping, noise; `common.privacy.make_private`
with the engine the product picks) of the same model take turns on one fixed random batch,
median of {first["timed_steps"]} each after {first["warmup_steps"]} warm-up
(`simulation/dp_speed.py`; goal: at most 2.0x).

{md_table(["model", "batch", "engine", "plain s/step", "DP-SGD s/step", "ratio"], cells)}
"""


def _targets_md(results: Mapping[str, Any]) -> str:
    rows = [
        [t["row"], t["what"], t["target"], fmt(t["measured"]), t["verdict"]]
        for t in results["targets"]
    ]
    return md_table(["row", "what", "target", "measured", "verdict"], rows)


def _section(title: str, row: Mapping[str, Any] | None, body: Any, out: Path) -> str:
    status = _status(row)
    text = f"_{status}_\n" if status else body(row, out)
    took = f" ({row['seconds'] / 60:.1f} min)" if row and "seconds" in row else ""
    return f"## {title}{took}\n\n{text}"


def _header(r: Mapping[str, Any]) -> str:
    m, d, s = r["machine"], r["data"], r["schedule"]
    device = f"GPU {m['gpu']}" if m["gpu"] else f"CPU {m['cpu']}, {m['cores']} cores"
    quick = " (a reduced schedule, not the full run)" if r["label"] == "QUICK" else ""
    partial = (
        ""
        if r.get("finished", True)
        else "\n\n**Partial report**: written after a row while the command still ran; a row "
        "not reached yet says so. If this is the last version, the command was stopped there."
    )
    sched = ", ".join(f"{k} {v}" for k, v in s.items() if k != "name")
    return f"""# idc-sim reproduce: {r["label"]}{quick}{partial}

- Machine: {device}; torch {m["torch"]}, {m["threads"]} thread(s), Python {m["python"]}.
- Started {r["started_utc"]}; wall time {r["wall_seconds"] / 60:.1f} min.
- Data: `{d["path"]}` ({d["source_patches"]} patches from {d["source_patients"]} patients);
  cohort used by every row: {d["patients"]} patients, {d["patches"]} patches
  ({d["idc_patches"]} IDC), digest `{d["digest"]}`.
- Schedule `{s["name"]}`: {sched}.
- Seeds: {r["seeds"]} (rows 1-3 use the first; row 4 every one).

{THRESHOLDS}

## Privacy unit

{PRIVACY_UNIT}

{PATIENT_MEANING}

## Targets of the issue

{_targets_md(r)}
"""


def write(out: Path, results: dict[str, Any]) -> Path:
    """Derive the targets, write results.json, figures/ and report.md into ``out``."""
    (out / "figures").mkdir(exist_ok=True)
    results["targets"] = targets(results)
    rows = results["rows"]
    parts = [
        _header(results),
        _section("1. The paper's protocol", rows.get("paper"), _paper, out),
        _section(
            "2. Centralized, patient split", rows.get("central"), lambda r, _: _central(r), out
        ),
        _section("3. FedAvg by patient", rows.get("fedavg"), _fedavg, out),
        _section("4. DP-SGD per site", rows.get("dp"), _dp, out),
    ]
    write_json(out / "results.json", results)
    (out / "report.md").write_text("\n".join(parts))
    return out / "report.md"
