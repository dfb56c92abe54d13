"""What the site's executor tells ``idc-client start``'s console: one event per message served.

The executor appends one JSON line per event to ``SITE_DIR/logs/events.jsonl`` (it knows the
run, the round, the action and the reply's metrics); ``idc-client start`` tails that file and
prints each event as one line (:func:`describe`). The file is a display channel only: the
signed audit log stays the record, and a failed write here never stops a round.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import protocol
from common.protocol import EvalMetrics, Histograms, TrainMetrics

if TYPE_CHECKING:  # the console reads events without importing Flower
    from flwr.app import Message

log = logging.getLogger(__name__)
EVENTS_NAME = "events.jsonl"


def events_path(site_dir: Path) -> Path:
    """Where the executor of the site at ``site_dir`` writes its events."""
    return Path(site_dir) / "logs" / EVENTS_NAME


def emit(site_dir: Path, event: dict[str, Any]) -> None:
    """Append ``event`` as one line; a failure is logged, never raised (display only)."""
    path = events_path(site_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(event) + "\n")
    except (OSError, TypeError, ValueError) as exc:
        log.warning("could not write a console event to %s: %s", path, exc)


def emit_reply(
    site_dir: Path, run_id: int, message: Message, reply: Message, ok: bool, why: str
) -> None:
    """:func:`emit` the event of one answered message; nothing here may stop the executor."""
    try:
        event = from_reply(run_id, message, reply, ok, why)
    except Exception as exc:  # display only: the task was already answered
        log.warning("no console event for run %s: %s", run_id, exc)
        return
    emit(site_dir, event)


def _round(message: Message) -> int | None:
    try:
        value = message.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND]
        return int(value)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


def from_reply(run_id: int, message: Message, reply: Message, ok: bool, why: str) -> dict:
    """The event of one answered message: what the reply says, never the weights."""
    action = message.metadata.message_type.split(".")[0]
    event: dict[str, Any] = {"run": str(run_id), "round": _round(message), "action": action}
    if not ok or reply.has_error():
        return {**event, "event": "failed", "reason": why or reply.error.reason}
    try:
        metrics = dict(reply.content.metric_records[protocol.METRICS])
        if action == "train":
            site = reply.content.config_records[protocol.SITE]
            train = TrainMetrics.from_record(metrics)
            return {
                **event,
                "event": "train",
                "status": str(site[protocol.STATUS]),
                "reason": str(site.get(protocol.REASON, "")),
                "patches": int(train.num_examples),
                "dp": train.dp == 1.0,
                "epsilon_round": train.epsilon_round,
                "epsilon_total": train.epsilon_total,
                "epsilon_cap": train.epsilon_cap,
            }
        if action == "query":  # a refinement (server.refine): counts only
            counts = Histograms.from_record(metrics)
            span = message.content.config_records[protocol.CONFIG][protocol.VAL_RANGE]
            return {
                **event,
                "event": "refine",
                "patches": sum(counts.positives) + sum(counts.negatives),
                "range": [float(x) for x in span],  # type: ignore[union-attr]
            }
        result = EvalMetrics.from_record(metrics)
        return {
            **event,
            "event": "evaluate",
            "patches": int(result.num_examples),
            "balanced_accuracy": result.balanced_accuracy,
        }
    except (KeyError, TypeError, ValueError) as exc:
        return {**event, "event": "answered", "reason": f"reply not readable here: {exc}"}


def _where(event: dict[str, Any]) -> str:
    rnd = event.get("round")
    return f"run {event.get('run')}" + (f" round {rnd}" if rnd is not None else "")


def _epsilon(event: dict[str, Any]) -> str:
    cap = float(event.get("epsilon_cap", protocol.NO_CAP))
    total = float(event.get("epsilon_total", 0.0))
    text = f"epsilon {float(event.get('epsilon_round', 0.0)):.3g} this round, {total:.3g} total"
    if cap != protocol.NO_CAP and math.isfinite(cap):
        text += f", cap {cap:g} ({max(cap - total, 0.0):.3g} left)"
    else:
        text += ", no cap"
    return text


def describe(event: dict[str, Any]) -> str:
    """One console line for ``event``."""
    kind, where = event.get("event"), _where(event)
    if kind == "ready":
        return f"ready: {event.get('patches')} patches mapped; waiting for the coordinator's rounds"
    if kind == "app-refused":
        return (
            f"{where}: refused the run's app {event.get('app')}: {event.get('reason')} "
            "(recorded in the audit log)"
        )
    if kind == "train" and event.get("status") == protocol.OK:
        dp = _epsilon(event) if event.get("dp") else "no DP"
        return f"{where}: trained on {event.get('patches')} patches; {dp}; update sent"
    if kind == "train":
        spent = _epsilon(event) if event.get("dp") else "no DP round"
        return f"{where}: update refused, no weights sent: {event.get('reason')} ({spent})"
    if kind == "evaluate":
        return (
            f"{where}: evaluation done on {event.get('patches')} test patches "
            f"(balanced accuracy {float(event.get('balanced_accuracy', math.nan)):.3f})"
        )
    if kind == "refine":
        lo, hi = event.get("range") or (math.nan, math.nan)
        return (
            f"{where}: sent histograms of P(IDC) on {event.get('patches')} validation patches, "
            f"binned on [{lo:g}, {hi:g}], for the decision threshold (counts only)"
        )
    if kind == "failed":
        return f"{where}: {event.get('action')} failed: {event.get('reason')}"
    return f"{where}: {event.get('action')} answered ({event.get('reason', '')})"


class Tail:
    """The new complete lines of a file that another process appends to."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path, self.offset = path, offset
        self._partial = b""

    def lines(self) -> list[str]:
        """Lines appended since the last call (a torn last line waits for its end)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *done, self._partial = data.split(b"\n")
        return [line.decode(errors="replace") for line in done]

    def events(self) -> list[dict[str, Any]]:
        """The new lines as events; a line that is no JSON object is skipped."""
        out = []
        for line in self.lines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out
