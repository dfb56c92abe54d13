"""How a scored model reads in the reproduction's report: rows at 0.5 and at its chosen t.

Table rows at 0.5 and at the validation-chosen threshold (with BAC gaps against a reference
scored the same way), and confusion matrices in counts and percent of the true class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.metrics import ACCURACY, AUC, BALANCED_ACCURACY, F1, PER_PATIENT
from simulation.report import fmt, md_table
from simulation.scoring import AT_CHOSEN

HEAD = (ACCURACY, BALANCED_ACCURACY, F1, AUC, *PER_PATIENT)
THRESHOLDS = (
    "Every model is scored twice on its test patients: **at 0.5** and **at the "
    "validation-chosen threshold t**, the one that maximises balanced accuracy on that run's "
    "own validation patients (the test patients never choose). Centralized, pooled and "
    "local-only models: exactly, on their validation patients' P(IDC). FedAvg and DP-SGD: the "
    "coordinator's own choice from the sites' summed validation histograms (what the product "
    "deploys), or, where those 50 bins cannot resolve the model (every P(IDC) in one bin), the "
    "exact choice on the sites' pooled validation patients; `results.json` names each "
    "threshold's source. The targets table uses the numbers at the validation-chosen threshold. "
    "Every metric weighs each test patch the same, as the issue's targets do, except the last "
    "two columns (`_per_patient`): there every test patient weighs the same (a patch 1 / its "
    "patient's patches), since a few patients hold hundreds of patches and most hold tens."
)


def metrics_row(name: str, m: Mapping[str, Any], extra: tuple[str, ...] = ()) -> list[str]:
    """One table row: name, extra cells, then the headline metrics (with spread if any)."""
    return [name, *extra, *(fmt(m.get(k), m.get(f"{k}_std")) for k in HEAD)]


def chosen_t(m: Mapping[str, Any]) -> str:
    """The validation-chosen threshold(s) of scores ``m``, as the report writes them."""
    at = m[AT_CHOSEN]
    if "threshold" in at:
        return f"t={at['threshold']:.3g}"
    if at.get("thresholds"):
        return "t=" + ", ".join(f"{t:.3g}" for t in at["thresholds"])
    return "t of each site"


def _gap(m: Mapping[str, Any], ref: Mapping[str, Any] | None) -> str:
    if ref is None:
        return ""
    return f" (gap {100 * (m[BALANCED_ACCURACY] - ref[BALANCED_ACCURACY]):+.1f} BAC points)"


def both_rows(
    name: str,
    m: Mapping[str, Any],
    extra: tuple[str, ...] = (),
    ref: Mapping[str, Any] | None = None,
) -> list[list[str]]:
    """A row at 0.5 and one at the validation-chosen threshold (gaps against ``ref``'s)."""
    rows = [metrics_row(f"{name}, at 0.5{_gap(m, ref)}", m, extra)]
    if AT_CHOSEN in m:
        at, ref_at = m[AT_CHOSEN], None if ref is None else ref[AT_CHOSEN]
        label = f"{name}, at the validation-chosen threshold {chosen_t(m)}{_gap(at, ref_at)}"
        rows.append(metrics_row(label, at, extra))
    return rows


def confusion_md(cm: list[list[int]]) -> str:
    """A confusion matrix as a markdown table: counts and % of the true class."""
    rows = []
    for name, (a, b) in zip(("true IDC(-)", "true IDC(+)"), cm, strict=True):
        total = max(a + b, 1)
        rows.append([name, f"{a} ({100 * a / total:.1f}%)", f"{b} ({100 * b / total:.1f}%)"])
    return md_table(["", "predicted IDC(-)", "predicted IDC(+)"], rows)
