"""A site's on-disk privacy ledger: every DP round run on each data set, and its total epsilon.

Opacus's accountants are a small history of ``(noise_multiplier, sample_rate, steps)``; this
module keeps that history on the site's disk, keyed by data-set fingerprint, so epsilon
composes across rounds, runs and process restarts instead of restarting at zero with each
new ``PrivacyEngine``. The file is JSON, replaced atomically on every write, and a ledger
that cannot be read or parsed is an error, never an empty history: a lost ledger would
silently reset the budget.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant

from common.config import Accountant
from common.errors import RefusedError
from common.fileio import atomic_write

log = logging.getLogger(__name__)

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
LEDGER_FORMAT = "idc-fl privacy ledger"
LEDGER_VERSION = 1


class LedgerError(RefusedError, RuntimeError):
    """The ledger file cannot be read, parsed or written; privacy must then fail closed."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class LedgerEntry:
    """One DP training round on one data set, as its accountant recorded it."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id must be a non-empty string, got {self.run_id!r}")
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
            raise ValueError(f"round must be an integer >= 0, got {self.round!r}")
        if not (_number(self.noise_multiplier) and 0 <= self.noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (_number(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (_number(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")


@dataclass(frozen=True)
class Refusal:
    """A round a site refused to train (budget spent, bad delta, ...): no weights were sent."""

    run_id: str
    round: int
    reason: str
    time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not isinstance(self.reason, str):
            raise ValueError(
                f"run_id and reason must be strings, got {self.run_id!r}, {self.reason!r}"
            )
        if not isinstance(self.round, int) or isinstance(self.round, bool):
            raise ValueError(f"round must be an integer, got {self.round!r}")


def epsilon_from_history(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: Accountant = "rdp"
) -> float:
    """Total epsilon at ``delta`` of a ``(noise_multiplier, sample_rate, steps)`` history.

    Parameters
    ----------
    history : sequence of (float, float, int)
        Opacus accountant history; entries compose in order.
    delta : float
        Target delta, in (0, 1).
    accountant : {"rdp", "prv"}
        Opacus ``RDPAccountant`` or ``PRVAccountant``.

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history and ``inf`` once any step had no noise.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    used = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not used:
        return 0.0
    if any(s == 0 for s, _, _ in used):
        return math.inf  # a noise-free step releases its batch exactly
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = used
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """Per-data-set DP history in one JSON file in the site's state folder.

    Every call reads the file afresh, so two objects on one path (a restart, a second run)
    always see the same history. Writes go to a temporary file that is fsynced and then
    ``os.replace``-d over the ledger, so a crash leaves the old or the new ledger, never half.

    Parameters
    ----------
    path : Path
        The ledger file; it need not exist yet (a site's first DP round).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- reading -----------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "datasets": {}}
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be read: {exc}") from exc
        try:
            data = json.loads(text)
            self._check(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is corrupt ({exc}); refusing to treat it as "
                "empty. Restore it from a backup; deleting it resets every privacy budget."
            ) from exc
        return data

    @staticmethod
    def _check(data: Any) -> None:
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ValueError("not a privacy ledger")
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported ledger version {data.get('version')!r}")
        if not isinstance(data["datasets"], dict):
            raise ValueError("'datasets' is not an object")
        for fp, rec in data["datasets"].items():
            if not isinstance(rec, dict):
                raise ValueError(f"data set {fp!r} is not an object")
            for row in rec["rounds"]:
                LedgerEntry(**row)  # validates every field
            for row in rec["refusals"]:
                Refusal(**row)

    def _dataset(self, fp: str) -> dict[str, list[dict[str, Any]]]:
        rec: dict[str, list[dict[str, Any]]] = self._load()["datasets"].get(fp, {})
        return {"rounds": rec.get("rounds", []), "refusals": rec.get("refusals", [])}

    def fingerprints(self) -> list[str]:
        """Data-set fingerprints with any recorded round or refusal."""
        return sorted(self._load()["datasets"])

    def history(self, fp: str) -> list[LedgerEntry]:
        """Every recorded DP round on data set ``fp``, oldest first."""
        return [LedgerEntry(**row) for row in self._dataset(fp)["rounds"]]

    def refusals(self, fp: str) -> list[Refusal]:
        """Every refused round on data set ``fp``, oldest first."""
        return [Refusal(**row) for row in self._dataset(fp)["refusals"]]

    def epsilon(self, fp: str, delta: float, accountant: Accountant = "rdp") -> float:
        """Total epsilon at ``delta`` spent on data set ``fp`` over its whole history."""
        return epsilon_from_history(_tuples(self.history(fp)), delta, accountant)

    def projected_epsilon(
        self,
        fp: str,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: Accountant = "rdp",
    ) -> float:
        """Total epsilon on ``fp`` if one more round of ``steps`` steps were added."""
        planned = (noise_multiplier, sample_rate, steps)
        return epsilon_from_history([*_tuples(self.history(fp)), planned], delta, accountant)

    # -- writing -----------------------------------------------------------------------

    def record(self, fp: str, entry: LedgerEntry) -> None:
        """Append a finished round to ``fp``'s history (before its weights leave the site)."""
        self._append(fp, "rounds", asdict(entry))
        log.info("privacy ledger %s: recorded %s for %s", self.path, entry, fp)

    def record_refusal(self, fp: str, run_id: str, round: int, reason: str) -> None:
        """Record that round ``round`` of ``run_id`` was refused on ``fp``, and why."""
        self._append(fp, "refusals", asdict(Refusal(run_id, round, reason)))
        log.warning(
            "privacy ledger %s: refused round %s of %s: %s", self.path, round, run_id, reason
        )

    def _append(self, fp: str, kind: str, row: dict[str, Any]) -> None:
        if not isinstance(fp, str) or not fp:
            raise ValueError(f"data-set fingerprint must be a non-empty string, got {fp!r}")
        with self._locked():
            data = self._load()  # re-read under the lock: no lost update from another writer
            rec = data["datasets"].setdefault(fp, {"rounds": [], "refusals": []})
            rec[kind].append(row)
            self._write(data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # POSIX only, as are the sites' hosts

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path, text, mode=0o600)
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be written: {exc}") from exc

    # -- reporting ---------------------------------------------------------------------

    def format(
        self, fp: str | None = None, delta: float | None = None, accountant: Accountant = "rdp"
    ) -> str:
        """A plain-text table of every round of every run, with cumulative epsilon.

        Parameters
        ----------
        fp : str, optional
            One data set; all of them by default.
        delta : float, optional
            Delta for the cumulative epsilon; by default each data set's latest round's.
        accountant : {"rdp", "prv"}
            Accountant for the cumulative epsilon.
        """
        fps = [fp] if fp is not None else self.fingerprints()
        if not fps:
            return f"privacy ledger {self.path}: no rounds recorded"
        return "\n\n".join(self._format_one(f, delta, accountant) for f in fps)

    def _format_one(self, fp: str, delta: float | None, accountant: Accountant) -> str:
        rows, refusals = self.history(fp), self.refusals(fp)
        at = delta if delta is not None else (rows[-1].delta if rows else None)
        lines = [
            f"data set {fp}"
            + (f"  (epsilon at delta={at:g}, {accountant})" if at is not None else "")
        ]
        lines.append(
            f"{'run':<20}{'round':>6}{'noise':>9}{'rate':>9}{'steps':>7}"
            f"{'delta':>10}{'total eps':>11}  time"
        )
        for i, e in enumerate(rows):
            eps = (
                epsilon_from_history(_tuples(rows[: i + 1]), at, accountant)
                if at is not None
                else 0.0
            )
            lines.append(
                f"{e.run_id[:19]:<20}{e.round:>6}{e.noise_multiplier:>9.4g}"
                f"{e.sample_rate:>9.4g}{e.steps:>7}{e.delta:>10.2g}{eps:>11.4g}"
                f"  {e.time}"
            )
        if not rows:
            lines.append("(no rounds)")
        for r in refusals:
            lines.append(f"refused: run {r.run_id} round {r.round} at {r.time}: {r.reason}")
        return "\n".join(lines)


def _tuples(entries: Sequence[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
