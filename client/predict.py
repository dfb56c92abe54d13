"""idc-client predict: run a verified model over new or labelled patches; CSVs, heatmaps.

Input is what :func:`common.data.load_patches` reads with labels optional: a folder of
patients or one patient's folder, patches named with a class (Kaggle layout) or without one
(new slides), with its handling of odd sizes (padded), non-RGB files (converted) and
unreadable files (skipped and listed). Metrics are computed on the labelled patches only,
and only when there are some.

Output folder: ``predictions.csv`` (one row per usable patch, with the decision threshold and
its source), ``patients.csv`` (share of each patient's patches predicted IDC),
``heatmaps/<patient>.png`` (titled with the share, the model and its run), ``summary.json``
(model record, threshold, data report) and, with labels, ``metrics.json`` and
``confusion.png``. The threshold rules are in :mod:`client.predict_report`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.predict_report import (
    Threshold,
    label_metrics,
    model_caption,
    patient_rows,
    prediction_rows,
    resolve_threshold,
    write_csv,
)
from common.data import UNLABELLED, LoadOptions, PatchSet, load_patches
from common.metrics import CONFUSION, json_safe

if TYPE_CHECKING:
    import torch

    from common.accel import Accel

# torch and matplotlib are imported where used: registering this subcommand must not slow
# every other idc-client command down by seconds.
log = logging.getLogger(__name__)
GPU_BATCH = 4096
CPU_BATCH = 256


# ``--compile auto`` compiles from this many patches on: measured on the shared 2-core CPU
# (real patches, batch 256, one thread), compiled inference ran at 290-301 patches per CPU
# second against 141-147 eager, after a first call of 54 s wall clock (load average 13);
# the warm-up is repaid from about 15,000 patches. No GPU has measured it yet: off there.
COMPILE_FROM = 20_000


def compile_word(word: str, n: int, device: torch.device) -> str:
    """``--compile`` resolved for ``n`` patches: ``auto`` is on for a large folder on a CPU.

    Only where a C++ compiler is present: ``auto`` never fails where eager works.
    """
    from common.accel import can_compile

    if word != "auto":
        return word
    large = device.type == "cpu" and n >= COMPILE_FROM
    return "on" if large and can_compile(device) else "off"


def default_batch_size(device: torch.device) -> int:
    """A batch that keeps a GPU busy: 1024 patches peaked at about 1.6 GiB in fp32 on an H100.

    4096 is therefore about 6.4 GiB at most (less in bf16); on a CPU larger batches gained
    nothing.
    """
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def load_network(
    path: Path, allow_unverified: bool = False
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """Read a model file (:func:`common.provenance.load_model`) into the right network."""
    from common.model import build_model, model_kind
    from common.provenance import ModelIntegrityError, detect_norm, load_model
    from common.site_data import set_weights

    arrays, metadata = load_model(path, allow_unverified)
    try:
        # The record names the network; plain weights (no record) are recognised by shape.
        kind = metadata.get("model") if metadata else None
        kind = kind or model_kind(arrays)
        model = set_weights(build_model(detect_norm(arrays), seed=0, kind=kind), arrays)
    except ValueError as exc:
        raise ModelIntegrityError(f"{path} does not hold this project's model: {exc}") from exc
    return model.eval(), metadata


def infer(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int,
    accel: Accel | None = None,
) -> np.ndarray:
    """Return P(IDC) for (N, 50, 50, 3) uint8 patches, in order.

    Patches go to the device as uint8 in chunks as large as fit there (all of a site's,
    usually), and become floats there: a quarter of the bytes on the bus, one copy per chunk
    rather than per batch, and no float copy on the CPU. ``accel`` (default: float32,
    contiguous) sets bf16 autocast and channels-last. Results stay on the device until the
    end so the host never waits on a batch before queueing the next.
    """
    import torch

    from common.accel import Accel

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    from tqdm import tqdm

    accel = accel or Accel(device)
    net = accel.compiled(accel.prepare(model).eval())
    out = []
    chunk = _chunk_size(len(images), batch_size, device)
    batches = -(-len(images) // batch_size)
    bar = tqdm(total=batches, desc="predicting", unit="batch", disable=None, leave=False)
    # disable=None: a bar on a terminal only; logs and captured output stay clean.
    with torch.no_grad(), bar:
        for first in range(0, len(images), chunk):
            # np.array: a read-only cache map cannot back a tensor; one copy per chunk
            resident = torch.from_numpy(np.array(images[first : first + chunk])).to(device)
            for start in range(0, len(resident), batch_size):
                x = resident[start : start + batch_size].permute(0, 3, 1, 2)
                x = accel.layout(x).float().div_(255.0)
                with accel.autocast():
                    logits = net(x)
                out.append(torch.softmax(logits.float(), dim=1)[:, 1])
                bar.update(1)
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def _chunk_size(n: int, batch_size: int, device: torch.device) -> int:
    """Patches per copy to the device: all when they fit, else whole batches that fit."""
    from common.resident import fits

    if device.type != "cuda":
        return batch_size  # the device is the host: batch-sized copies stay in the CPU cache
    chunk = max(n, 1)
    while chunk > batch_size and not fits(chunk * 50 * 50 * 3, device):
        chunk //= 2
    return chunk if chunk >= n else max(chunk // batch_size, 1) * batch_size


def _write_metrics(out: Path, patches: PatchSet, probs: np.ndarray, th: Threshold) -> Any:
    from common.plots import plot_confusion

    known = patches.labels != UNLABELLED
    if not known.any():
        return None
    metrics = label_metrics(patches.labels[known], probs[known], th.value)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    title = f"{int(known.sum())} labelled patches, threshold {th.value:g}"
    plot_confusion(metrics[CONFUSION], out / "confusion.png", title)
    return metrics


def run_predict(
    model: torch.nn.Module,
    data: Path,
    out: Path,
    metadata: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    batch_size: int | None = None,
    heatmap_cell: int | None = 10,
    device: str = "auto",
    *,
    threshold: float | None = None,
    model_path: Path = Path("model.idc"),
    precision: str = "auto",
    channels_last: str = "auto",
    compile: str = "auto",
) -> dict[str, Any]:
    """Predict every usable patch under ``data`` and write the output files to ``out``.

    ``model`` comes from :func:`load_network` and ``metadata`` is its record (``None``:
    unverified). ``heatmap_cell`` is the pixels per patch in the mosaics (a divisor of 50);
    ``None`` skips the heatmaps. ``threshold`` overrides the record's (see
    :func:`client.predict_report.resolve_threshold`). ``precision`` and ``channels_last``
    are :class:`common.accel.Accel`'s words (auto: bf16 on a GPU, channels-last everywhere);
    ``compile`` too, where auto means :func:`compile_word`. Returns the summary also written
    to ``summary.json``.

    Raises
    ------
    NoUsableData
        If ``data`` holds no usable patch.
    ValueError
        If the model record's threshold is not a number between 0 and 1.
    """
    from client.heatmap import write_heatmaps
    from common.accel import Accel
    from common.training import resolve_device

    th = resolve_threshold(threshold, metadata)
    if batch_size is not None and batch_size < 1:  # 0 once meant the default, silently
        raise ValueError(f"--batch-size must be >= 1, got {batch_size} (leave it out: auto)")
    dev = resolve_device(device)
    accel = Accel.resolve(dev, precision, channels_last, compile)  # bad words: before decode
    patches = load_patches(
        data, cache_dir=cache_dir, options=LoadOptions(), workers=2, require_labels=False
    )
    batch = batch_size if batch_size is not None else default_batch_size(dev)
    accel = Accel.resolve(dev, precision, channels_last, compile_word(compile, len(patches), dev))
    probs = infer(model, patches.images, dev, batch, accel)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictions.csv", prediction_rows(patches, probs, th))
    per_patient = patient_rows(patches, probs, th.value)
    write_csv(out / "patients.csv", per_patient)
    metrics = _write_metrics(out, patches, probs, th)
    caption = model_caption(metadata, model_path)
    heatmaps = 0
    if heatmap_cell is not None:
        heatmaps = write_heatmaps(out / "heatmaps", patches, probs, heatmap_cell, th.value, caption)
    summary = {
        "model": {"file": str(model_path), "verified": metadata is not None, "record": metadata},
        "threshold": th.as_dict(),
        "data": {
            "root": patches.report.root,
            "fingerprint": patches.fingerprint,
            "report": vars(patches.report),
        },
        "device": accel.describe(),
        "patches": len(patches),
        "labelled": int((patches.labels != UNLABELLED).sum()),
        "patients": per_patient,
        "heatmaps": heatmaps,
        "metrics": metrics,
    }
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    return summary
