"""The model file: weights plus a provenance record, checked against the weights' digest on load.

Format ``idc-fl-model/1``: one file written by ``torch.save`` holding a plain dict::

    {"format": "idc-fl-model/1",
     "metadata": "<JSON text>",
     "state_dict": {name: tensor, ...}}

It loads with ``torch.load(..., weights_only=True)`` (only tensors, strings and dicts, never
arbitrary pickled objects), so opening a file from elsewhere runs no code. The metadata is kept
as JSON text rather than a nested dict so that what is read back is exactly what was written,
and so any JSON tool can show it. The record always carries ``weights_digest``, the
:func:`common.audit.digest_update` of the weights; :func:`load_model` recomputes it and refuses
a file whose weights do not match (:class:`ModelIntegrityError`).

What the digest proves, and what it does not: it catches a corrupted or edited weight and a
record paired with other weights. It is not a signature, so whoever can edit the file can also
rewrite the digest. Authenticity comes from the coordinator's audit log: the record's
``audit`` position (``seq`` and ``hash`` of the ``run.finished`` entry, whose ``final_digest``
equals ``weights_digest``) can be checked with ``common.audit_verify.verify_log(...,
expect_head=...)`` against the signed log.

A plain state dict (the centralized baseline's ``model.pt``) or ``.npz`` of arrays (a
run's checkpoints) has no record to check; :func:`load_model` reads one
only when asked with ``allow_unverified=True``.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.audit import LogHead
from common.config import Norm
from common.digests import digest_update
from common.errors import RefusedError
from common.fileio import atomic_write
from common.metrics import json_safe
from common.protocol import EPSILON_TOTAL

log = logging.getLogger(__name__)

FORMAT = "idc-fl-model/1"
FINGERPRINT_NOTE = (
    "data set fingerprints are recorded only in each site's own audit log ('data.read' "
    "entries); the coordinator never receives them, so they are absent here"
)
EPSILON_NOTE = (
    "epsilon is the site's latest reported 'epsilon-total' (DP-SGD, record-level, over the "
    "site's lifetime on that data set); null means the site trained without DP: no guarantee"
)


class ModelIntegrityError(RefusedError, ValueError):
    """A model file is not a verifiable model, or its weights do not match its record."""


def detect_norm(arrays: Mapping[str, Any]) -> Norm:
    """Return ``"batch"`` when the weights hold batch-norm running statistics, else ``"group"``."""
    return "batch" if any(k.endswith("running_mean") for k in arrays) else "group"


def save_model(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> Path:
    """Write weights and their record to ``path`` atomically; the record gains the digest.

    Raises
    ------
    ValueError
        If ``metadata`` already names a different ``weights_digest`` or is not JSON.
    """
    path = Path(path)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    digest = digest_update(arrays)
    record = dict(metadata)
    if record.setdefault("weights_digest", digest) != digest:
        raise ValueError(
            f"metadata weights_digest {record['weights_digest']!r} does not match the weights "
            f"({digest})"
        )
    text = json.dumps(json_safe(record), sort_keys=True, allow_nan=False)
    payload = {
        "format": FORMAT,
        "metadata": text,
        "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return path


def _read(path: Path) -> object:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        pickle.UnpicklingError,
    ) as exc:
        # A truncated or foreign file surfaces as any of these from torch's unpickler, whose
        # long advice (retry with weights_only=False) is exactly what we must not do.
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ModelIntegrityError(
            f"{path} is not a readable model file ({type(exc).__name__}: {first})"
        ) from exc


def _numpy(state: Mapping[Any, Any], path: Path) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor | np.ndarray):
            raise ModelIntegrityError(f"{path}: entry {k!r} is not a named tensor")
        out[k] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
    return out


def _verified(payload: Mapping[str, Any], path: Path) -> tuple[dict[str, np.ndarray], dict]:
    if payload.get("format") != FORMAT:
        raise ModelIntegrityError(f"{path}: unknown model format {payload.get('format')!r}")
    try:
        metadata = json.loads(payload["metadata"])
        state = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelIntegrityError(f"{path}: model record is unreadable: {exc}") from exc
    if not isinstance(metadata, dict) or not isinstance(state, Mapping):
        raise ModelIntegrityError(f"{path}: model record is not a mapping")
    arrays = _numpy(state, path)
    expected, actual = metadata.get("weights_digest"), digest_update(arrays)
    if expected != actual:
        raise ModelIntegrityError(
            f"{path}: weights do not match the model record (record says {expected}, weights "
            f"hash to {actual}); the file was altered or damaged"
        )
    return arrays, metadata


def load_model(
    path: Path, allow_unverified: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Read a model file and check its weights against its record.

    Returns ``(arrays, metadata)``; ``metadata`` is ``None`` for a plain state dict or
    ``.npz``, which is read only when ``allow_unverified`` is true (with a warning).

    Raises
    ------
    ModelIntegrityError
        If the file is unreadable, its weights do not match its record, or it has no record
        and ``allow_unverified`` is false. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    payload = _read(path)
    if not isinstance(payload, Mapping):
        raise ModelIntegrityError(f"{path} holds a {type(payload).__name__}, not a model")
    if "format" in payload:
        return _verified(payload, path)
    if not allow_unverified:
        raise ModelIntegrityError(
            f"{path} is a plain state dict with no provenance record or digest; "
            "load it only if you trust its source (allow_unverified / --allow-unverified)"
        )
    arrays = _numpy(payload, path)
    log.warning("UNVERIFIED model %s: no provenance record; its origin is not checked", path)
    return arrays, None


def _site_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per site: rounds whose update was averaged in, and the latest epsilon it reported."""
    sites: dict[str, dict[str, Any]] = {}
    for row in rows:
        for name, metrics in (row.get("sites") or {}).items():
            entry = sites.setdefault(name, {"site": name, "rounds": 0, "fingerprint": None})
            entry["rounds"] += 1
            entry["last_round"] = int(row["round"])
            dp = bool(metrics.get("dp", 0.0))
            entry["dp"] = dp
            # Without DP the client reports 0.0; that is "no guarantee", never epsilon 0.
            entry["epsilon"] = float(metrics[EPSILON_TOTAL]) if dp else None
    return [sites[k] for k in sorted(sites)]


def run_metadata(
    run_id: str,
    rounds: int,
    rows: Sequence[Mapping[str, Any]],
    head: LogHead | None,
    **extra: Any,
) -> dict[str, Any]:
    """Build the coordinator's record of a finished run from what it knows.

    ``rows`` are the run's ``rounds.jsonl`` lines; ``head`` is the coordinator's audit head
    after its ``run.finished`` entry (``None`` when the run had no audit log).
    """
    audit = None if head is None else {"seq": head.seq, "hash": head.hash, "entry": "run.finished"}
    record: dict[str, Any] = {
        "run_id": run_id,
        "rounds": int(rounds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sites": _site_rows(rows),
        "epsilon_note": EPSILON_NOTE,
        "fingerprint_note": FINGERPRINT_NOTE,
        "audit": audit,
        **extra,
    }
    if head is None:
        record["audit_note"] = "the run had no coordinator audit log"
    return record


def describe(metadata: Mapping[str, Any] | None) -> str:
    """Return a few human-readable lines about a model's record."""
    if metadata is None:
        return "model provenance: NONE (unverified plain weights)"
    lines = [
        f"model run: {metadata.get('run_id')}  rounds: {metadata.get('rounds')}",
        f"weights digest: {metadata.get('weights_digest')} (verified)",
    ]
    audit = metadata.get("audit")
    if audit:
        lines.append(f"coordinator audit log position: seq {audit['seq']} hash {audit['hash']}")
    else:
        note = metadata.get("audit_note", "not recorded")
        lines.append(f"coordinator audit log position: {note}")
    for site in metadata.get("sites", []):
        eps = "no DP" if site.get("epsilon") is None else f"epsilon {site['epsilon']:.3g}"
        fp = site.get("fingerprint") or "unknown"
        lines.append(f"  site {site['site']}: {site['rounds']} round(s), {eps}, data set {fp}")
    return "\n".join(lines)
