"""Reports of simulations: JSON, Markdown tables and PNG plots of compare runs and sweeps."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from common.metrics import (  # noqa: E402
    ACCURACY,
    AUC,
    AUC_PER_PATIENT,
    BAC_PER_PATIENT,
    BALANCED_ACCURACY,
    F1,
    json_safe,
)
from common.privacy import PRIVACY_UNIT  # noqa: E402
from simulation.scoring import AT_CHOSEN  # noqa: E402

COLUMNS = (
    (ACCURACY, "accuracy"),
    (BALANCED_ACCURACY, "balanced accuracy"),
    (F1, "F1"),
    (AUC, "AUC"),
    (BAC_PER_PATIENT, "balanced accuracy per patient"),  # every test patient weighs the same
    (AUC_PER_PATIENT, "AUC per patient"),
)


def fmt(value: Any, spread: Any = None) -> str:
    """A metric as text: 4 decimals, ``n/a`` when missing or undefined, ``± spread`` if given."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    if isinstance(spread, int | float) and math.isfinite(spread):
        return f"{value:.4f} ± {spread:.4f}"
    return f"{value:.4f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, value: Any) -> Path:
    """JSON with NaN and infinity written as null."""
    path.write_text(json.dumps(json_safe(value), indent=2))
    return path


def fedavg_label(run: Mapping[str, Any]) -> str:
    """``FedAvg``, or ``FedAvg + DP-SGD`` with its budget."""
    dp = run.get("dp")
    if not dp:
        return "FedAvg"
    if dp.get("epsilon"):
        return f"FedAvg + DP-SGD (epsilon {dp['epsilon']:g})"
    return f"FedAvg + DP-SGD (noise {dp['noise_multiplier']:g})"


def headline_rows(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, union-test metrics) of centralized, each FedAvg run and local-only."""
    rows = [("centralized (pooled)", results["centralized"]["union"])]
    rows += [(fedavg_label(run), run["union"]) for run in results["fedavg"].values()]
    if results.get("local_only"):
        rows.append(("local-only (mean ± sd over sites)", results["local_only"]["union"]))
    return rows


def chosen_bac(metrics: Mapping[str, Any]) -> str:
    """Balanced accuracy at the validation-chosen threshold (``n/a`` where none was chosen)."""
    at = metrics.get(AT_CHOSEN) or {}
    return fmt(at.get(BALANCED_ACCURACY), at.get(f"{BALANCED_ACCURACY}_std"))


CHOSEN_HEADER = "balanced accuracy at the validation-chosen threshold"
CHOSEN_NOTE = (
    "Metrics are at the decision threshold 0.5, except the column at the threshold chosen on "
    "validation patients only (the one a deployed model carries; see results.json for it and "
    "its source). Every metric weighs each test patch the same, except those per patient: "
    "there every test patient weighs the same (a patch 1 / its patient's patches)."
)


def compare_table(results: Mapping[str, Any]) -> str:
    """The headline table on the union of every site's test patients."""
    rows = [
        [name] + [fmt(m.get(k), m.get(f"{k}_std")) for k, _ in COLUMNS] + [chosen_bac(m)]
        for name, m in headline_rows(results)
    ]
    return md_table(["model", *(label for _, label in COLUMNS), CHOSEN_HEADER], rows)


def _verdict(fed: float, loc: float) -> str:
    if abs(loc - fed) < 1e-9:
        return "tie"
    return "**local-only better**" if loc > fed else "FedAvg better"


def site_table(results: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Per-site balanced accuracy on each site's own test patients; sites where local wins."""
    bacc, runs, loc = BALANCED_ACCURACY, list(results["fedavg"].values()), results["local_only"]
    header = ["site", "patients", "train / test patches", "IDC share", "centralized"]
    header += [fedavg_label(r) for r in runs]
    header += [f"epsilon spent, {fedavg_label(r)}" for r in runs if r.get("dp")]
    header += ["local-only", "local-only vs FedAvg"] if loc else []
    rows, losers = [], []
    for name, facts in results["sites"].items():
        row = [
            name,
            str(facts["patients"]),
            f"{facts['train']} / {facts['test']}",
            f"{facts['idc_share']:.2f}",
            fmt(results["centralized"]["sites"][name][bacc]),
        ]
        row += [fmt(r["sites"][name][bacc]) for r in runs]
        row += [fmt(r["epsilon"].get(name)) for r in runs if r.get("dp")]
        if loc:
            fed, mine = runs[0]["sites"][name][bacc], loc["sites"][name][bacc]
            row += [fmt(mine), _verdict(fed, mine)]
            losers += [name] if mine > fed + 1e-9 else []
        rows.append(row)
    return md_table(header, rows), losers


def plot_compare(results: Mapping[str, Any], path: Path) -> Path:
    """Balanced accuracy against epochs of training (left) and per site (right)."""
    bacc = BALANCED_ACCURACY
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    cen = results["centralized"]["curve"]
    ax.plot(
        [r["epoch"] for r in cen],
        [r.get("val_balanced_accuracy") for r in cen],
        "o-",
        label="centralized, union test",
    )
    for run in results["fedavg"].values():
        ax.plot(
            [r["epoch"] for r in run["curve"]],
            [r[bacc] for r in run["curve"]],
            "s-",
            label=f"{fedavg_label(run)}, union test",
        )
    for i, curve in enumerate((results.get("local_only") or {}).get("curves", {}).values()):
        ax.plot(
            [r["epoch"] for r in curve],
            [r.get("val_balanced_accuracy") for r in curve],
            ":",
            color="grey",
            alpha=0.6,
            label="local-only, own test" if i == 0 else None,
        )
    ax.set(
        xlabel="epochs over the training patients (FedAvg: rounds x local epochs)",
        ylabel="balanced accuracy",
        title="held-out patients",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = list(results["sites"])
    series = [("centralized", results["centralized"])]
    series += [(fedavg_label(r), r) for r in results["fedavg"].values()]
    series += [("local-only", results["local_only"])] if results.get("local_only") else []
    width = 0.8 / len(series)
    for j, (label, res) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        bx.bar(xs, [res["sites"][n][bacc] for n in names], width, label=label)
    bx.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0, fontsize=7)
    bx.set(ylabel="balanced accuracy", title="each site's own test patients", ylim=(0, 1))
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def privacy_text(results: Mapping[str, Any]) -> str:
    """What privacy each FedAvg run had, and the privacy unit."""
    lines = []
    for run in results["fedavg"].values():
        dp = run.get("dp")
        if not dp:
            lines.append(
                "- FedAvg without DP-SGD: the shared updates carry no formal privacy guarantee."
            )
            continue
        spent = max(run["epsilon"].values()) if run["epsilon"] else float("nan")
        target = f"target total epsilon {dp['epsilon']:g} per site, " if dp.get("epsilon") else ""
        lines.append(
            f"- {fedavg_label(run)}: sample-level DP-SGD at every site, {target}noise "
            f"multiplier {dp['noise_multiplier']:.4f}, clipping norm "
            f"{dp['max_grad_norm']:g}, delta {dp['delta']:g}; the largest epsilon a "
            f"site spent over the whole run is {spent:.3f} (each site's own privacy "
            "ledger)."
        )
    lines.append("- Centralized and local-only training use no DP: they are references.")
    return "\n".join(lines) + f"\n\n{PRIVACY_UNIT}"


def recipe_note(plan: Mapping[str, Any]) -> str:
    """`` Recipe: model=gap, ...`` for a plan run with recipe overrides, else nothing."""
    pairs = plan.get("overrides") or []
    return (" Recipe: " + ", ".join(f"`{k}={v}`" for k, v in pairs) + ".") if pairs else ""


def write_compare(out: Path, results: Mapping[str, Any]) -> Path:
    """results.json, curves.png and report.md in ``out``; returns the report's path."""
    write_json(out / "results.json", results)
    plot_compare(results, out / "curves.png")
    plan, union = results["plan"], results["union_test"]
    sites_md, losers = site_table(results)
    lose = ""
    if results.get("local_only"):
        lose = (
            f"**Local-only beats FedAvg at {len(losers)} of {len(results['sites'])} "
            f"sites: {', '.join(losers)}.**"
            if losers
            else "FedAvg is at least as good as local-only training at every site."
        )
    runs = ", ".join(f"`{name}/`" for name in results["fedavg"])
    n_patients = sum(s["patients"] for s in results["sites"].values())
    text = f"""# Federated by patient vs centralized vs local-only

- Data: `{plan["data"]}`, {n_patients} patients in {plan["sites"]} virtual sites, partition
  `{plan["partition"]}` (`partition.json` lists each site's patients).
- Schedule: FedAvg {plan["rounds"]} rounds x {plan["local_epochs"]} local epoch(s); the others
  train for the same number of epochs. Learning rate {plan["lr"]:g}, batch
  {plan["batch_size"]}, norm `{plan["norm"]}`, seed {plan["seed"]}.{recipe_note(plan)}
- Held out: the union of every site's own test patients ({union["patients"]} patients,
  {union["patches"]} patches), split exactly as the ClientApp splits them. Every model is
  scored on them; nothing was selected on them (no early stopping).

{compare_table(results)}

{CHOSEN_NOTE}

Per site, balanced accuracy on that site's own test patients:

{sites_md}

{lose}

## Privacy

{privacy_text(results)}

## Files

`results.json` (every number), `curves.png`, `partition.json`; per FedAvg run ({runs}):
`run/` (the ServerApp's rounds.jsonl, checkpoints, final model, curves), `sites/site-NNN/state/`
(each virtual site's signed audit log and privacy ledger), `coord/` (the coordinator's audit
log and the registered site keys).
"""
    (out / "report.md").write_text(text)
    return out / "report.md"


def _eps_text(eps: float) -> str:
    return "inf (no DP)" if math.isinf(eps) else f"{eps:g}"


def sweep_table(results: Mapping[str, Any]) -> str:
    """One row per epsilon: noise, epsilon spent, metrics as mean ± sd over seeds."""
    rows = []
    for r in results["summary"]:
        rows.append(
            [
                _eps_text(r["epsilon"]),
                f"{r['noise_multiplier']:.4f}",
                f"{r['epsilon_spent_max']:.3f}" if math.isfinite(r["epsilon"]) else "-",
                fmt(r[BALANCED_ACCURACY], r[f"{BALANCED_ACCURACY}_std"]),
                fmt(r[AUC], r[f"{AUC}_std"]),
                fmt(r[F1], r[f"{F1}_std"]),
                chosen_bac(r),
                str(len(r["seeds"])),
            ]
        )
    return md_table(
        [
            "total epsilon per site",
            "noise multiplier",
            "max epsilon spent",
            "balanced accuracy",
            "AUC",
            "F1",
            CHOSEN_HEADER,
            "seeds",
        ],
        rows,
    )


def plot_sweep(results: Mapping[str, Any], path: Path) -> Path:
    """Balanced accuracy and AUC against epsilon (log axis; no DP drawn at the right end)."""
    rows = results["summary"]
    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    right = max(finite) * 4 if finite else 1.0  # where the no-DP point is drawn
    xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else right for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(
        axes, ((BALANCED_ACCURACY, "balanced accuracy"), (AUC, "ROC AUC")), strict=True
    ):
        ys = [r[key] for r in rows]
        errs = [0.0 if not math.isfinite(r[f"{key}_std"]) else r[f"{key}_std"] for r in rows]
        ax.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=4)
        ax.set_xscale("log")
        ax.set_xticks(xs, [_eps_text(r["epsilon"]).replace(" (no DP)", "\n(no DP)") for r in rows])
        ax.minorticks_off()
        ax.set(xlabel="total epsilon per site (sample-level)", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(results['seeds'])} seed(s); error bars: standard deviation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweep(out: Path, results: Mapping[str, Any]) -> Path:
    """sweep.json, sweep.png and sweep.md in ``out``; returns the Markdown's path."""
    write_json(out / "sweep.json", results)
    plot_sweep(results, out / "sweep.png")
    plan, dp = results["plan"], results["dp"]
    text = f"""# What each privacy budget costs FedAvg

- Data: `{plan["data"]}` in {plan["sites"]} virtual sites, partition `{plan["partition"]}`.
- Schedule: {plan["rounds"]} rounds x {plan["local_epochs"]} local epoch(s), learning rate
  {plan["lr"]:g}, batch {plan["batch_size"]}, norm `group` for every point (DP-SGD needs
  it).{recipe_note(plan)}
- DP-SGD at every site: clipping norm {dp["max_grad_norm"]:g}, delta {dp["delta"]:g},
  {dp["accountant"].upper()} accountant. Epsilon is the total budget of each site over the
  whole run; the noise multiplier was computed offline so that no site exceeds it (the
  smallest site needs the most noise). "max epsilon spent" is the largest total any site's
  own privacy ledger recorded.
- Scored on the union of every site's own test patients; seeds {results["seeds"]}
  (mean ± standard deviation over seeds).

{sweep_table(results)}

{CHOSEN_NOTE}

![balanced accuracy and AUC against epsilon](sweep.png)

{PRIVACY_UNIT}

Every run's folder is under `runs/` (`eps-<epsilon>-seed-<seed>/run/rounds.jsonl` etc.).
"""
    (out / "sweep.md").write_text(text)
    return out / "sweep.md"
