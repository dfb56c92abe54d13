"""idc-client predict: run a verified model over a folder of patches; CSVs, metrics, heatmaps.

Input is what the foundation loader reads (:func:`common.data.load_patches`): a folder in the
Kaggle layout ``<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png``, with its handling
of odd sizes (padded), non-RGB files (converted) and unreadable files (skipped and listed).
Names outside that layout are ignored, as everywhere else, so every predicted patch has a
true label and the metrics are always computed.

Output folder: ``predictions.csv`` (one row per usable patch), ``patients.csv`` (share of
each patient's patches predicted IDC), ``metrics.json`` and ``confusion.png`` (the baseline's
metrics), ``heatmaps/<patient>.png`` and ``summary.json`` (model record, data report).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.cli_util import add_command
from common.data import LoadOptions, PatchSet, load_patches
from common.metrics import SCALAR_METRICS, Evaluation, json_safe, score

if TYPE_CHECKING:
    import torch

# torch and matplotlib are imported where used: registering this subcommand must not slow
# every other idc-client command down by seconds.
log = logging.getLogger(__name__)
THRESHOLD = 0.5  # the operating point of common.metrics.score
GPU_BATCH = 1024
CPU_BATCH = 256


def default_batch_size(device: torch.device) -> int:
    """A batch that keeps a GPU busy: 1024 patches peak at about 1.6 GiB on an H100."""
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def load_network(
    path: Path, allow_unverified: bool = False
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """Read a model file (:func:`common.provenance.load_model`) into the right network."""
    from common.model import build_model
    from common.provenance import ModelIntegrityError, detect_norm, load_model
    from common.site_data import set_weights

    arrays, metadata = load_model(path, allow_unverified)
    try:
        model = set_weights(build_model(detect_norm(arrays), seed=0), arrays)
    except ValueError as exc:
        raise ModelIntegrityError(f"{path} does not hold this project's model: {exc}") from exc
    return model.eval(), metadata


def infer(
    model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int
) -> np.ndarray:
    """Return P(IDC) for (N, 50, 50, 3) uint8 patches, in order.

    Batches cross to the device as uint8 and become floats there: a quarter of the bytes
    on the bus, and no float copy on the CPU. Results stay on the device until the end so the
    host never waits on a batch before queueing the next.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    model.eval().to(device)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if not (batch.flags.writeable and batch.flags.c_contiguous):
                batch = np.array(batch)  # a read-only cache map: torch wants its own buffer
            chunk = torch.from_numpy(batch)
            x = chunk.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1])
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def prediction_rows(patches: PatchSet, probs: np.ndarray) -> list[dict[str, Any]]:
    """One row per patch: file, patient, x, y, probability, predicted class, true label."""
    return [
        {
            "file": f,
            "patient": str(p),
            "x": int(x),
            "y": int(y),
            "probability": f"{pr:.6f}",
            "predicted": int(pr >= THRESHOLD),
            "label": int(lab),
        }
        for f, p, x, y, pr, lab in zip(
            patches.files,
            patches.patients,
            patches.xs,
            patches.ys,
            probs,
            patches.labels,
            strict=True,
        )
    ]


def patient_rows(patches: PatchSet, probs: np.ndarray) -> list[dict[str, Any]]:
    """Per patient: patches, share predicted IDC, mean probability, share truly IDC."""
    rows = []
    for patient in sorted(set(patches.patients.tolist()), key=lambda p: (len(p), p)):
        sel = patches.patients == patient
        pred = probs[sel] >= THRESHOLD
        rows.append(
            {
                "patient": patient,
                "patches": int(sel.sum()),
                "predicted_idc": int(pred.sum()),
                "predicted_idc_share": float(pred.mean()),
                "mean_probability": float(probs[sel].mean()),
                "true_idc": int(patches.labels[sel].sum()),
                "true_idc_share": float(patches.labels[sel].mean()),
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_metrics(labels: np.ndarray, probs: np.ndarray) -> Evaluation:
    """The baseline's metrics: mean cross-entropy, classification metrics, example count."""
    p_true = np.where(labels == 1, probs, 1.0 - probs).astype(np.float64)
    loss = float(-np.log(np.clip(p_true, 1e-12, 1.0)).mean())
    return score(labels, probs, loss, THRESHOLD)


def write_heatmaps(out: Path, patches: PatchSet, probs: np.ndarray, cell: int) -> int:
    """One PNG per patient under ``out``; returns how many were written."""
    from client.heatmap import plot_patient

    out.mkdir(parents=True, exist_ok=True)
    patients = patches.patients
    for patient in sorted(set(patients.tolist())):
        idx = np.flatnonzero(patients == patient)
        plot_patient(
            patient,
            patches.images[idx],
            patches.xs[idx],
            patches.ys[idx],
            probs[idx],
            out / f"{patient}.png",
            patches.labels[idx],
            cell,
        )
    return len(set(patients.tolist()))


def run_predict(
    model: torch.nn.Module,
    data: Path,
    out: Path,
    metadata: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    batch_size: int | None = None,
    heatmap_cell: int | None = 10,
    device: str = "auto",
) -> dict[str, Any]:
    """Predict every usable patch under ``data`` and write the output files to ``out``.

    ``model`` comes from :func:`load_network` and ``metadata`` is its record (``None``:
    unverified). ``heatmap_cell`` is the pixels per patch in the mosaics (a divisor of 50);
    ``None`` skips the heatmaps. Returns the summary also written to ``summary.json``.

    Raises
    ------
    NoUsableData
        If ``data`` holds no usable patch.
    """
    from common.plots import plot_confusion
    from common.training import resolve_device

    patches = load_patches(data, cache_dir=cache_dir, options=LoadOptions(), workers=2)
    dev = resolve_device(device)
    probs = infer(model, patches.images, dev, batch_size or default_batch_size(dev))
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "predictions.csv", prediction_rows(patches, probs))
    per_patient = patient_rows(patches, probs)
    _write_csv(out / "patients.csv", per_patient)
    evaluation = label_metrics(patches.labels, probs)
    metrics = evaluation.as_dict()
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    plot_confusion(evaluation.confusion, out / "confusion.png", "predict")
    heatmaps = 0
    if heatmap_cell is not None:
        heatmaps = write_heatmaps(out / "heatmaps", patches, probs, heatmap_cell)
    summary = {
        "model": {"verified": metadata is not None, "record": metadata},
        "data": {
            "root": patches.report.root,
            "fingerprint": patches.fingerprint,
            "report": vars(patches.report),
        },
        "device": str(dev),
        "patches": len(patches),
        "patients": len(per_patient),
        "heatmaps": heatmaps,
        "metrics": metrics,
    }
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    return summary


def _fmt(value: object) -> str:
    return "n/a" if not isinstance(value, float) or math.isnan(value) else f"{value:.4f}"


def _predict_cmd(args: argparse.Namespace) -> int:
    from common.provenance import describe

    model, metadata = load_network(args.model, args.allow_unverified)
    print(describe(metadata))
    if metadata is None:
        print(
            "WARNING: this model has no provenance record; its origin is unchecked", file=sys.stderr
        )
    summary = run_predict(
        model,
        args.data,
        args.out,
        metadata,
        args.cache_dir,
        args.batch_size,
        None if args.no_heatmaps else args.cell,
        args.device,
    )
    report = summary["data"]["report"]
    print(
        f"predicted {summary['patches']} patches of {summary['patients']} patients "
        f"on {summary['device']}; {len(report['unreadable'])} unreadable skipped"
    )
    m = summary["metrics"]
    print("  ".join(f"{k} {_fmt(m[k])}" for k in SCALAR_METRICS))
    print(f"written to {args.out}")
    return 0


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-client predict``."""
    p = add_command(
        sub, "predict", _predict_cmd, "run a model over a folder: predictions, heatmaps"
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model file (the coordinator's final/model.idc)"
    )
    p.add_argument("--data", type=Path, required=True, help="folder in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size (default {GPU_BATCH} on GPU, {CPU_BATCH} on CPU)",
    )
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda:N")
    p.add_argument(
        "--cell",
        type=int,
        default=10,
        choices=(1, 2, 5, 10, 25, 50),
        help="heatmap mosaic pixels per patch (50: full resolution)",
    )
    p.add_argument("--no-heatmaps", action="store_true", help="skip the per-patient PNGs")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept plain weights (.pt/.npz) with no provenance (warns)",
    )
