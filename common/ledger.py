"""A site's on-disk privacy ledger: every DP round the site ever trained, in one history.

Storage only; the maths is :mod:`common.accounting`. The ledger is kept per SITE, not per
data set: every round of every run composes into one history whatever the data folder held
at the time, because a folder's listing is no identity of its patients (an empty patch-like
file, a renamed patch or a re-saved PNG would otherwise each open a fresh budget). Each entry
keeps the data set's fingerprint as information only.

A round is written twice: :meth:`PrivacyLedger.reserve` appends its planned cost under the
file lock, after a caller's check of the history read under that same lock (so two runs on
one site cannot both pass a cap), and before any training; :meth:`PrivacyLedger.settle`
then records the steps the accountant took. A round that fails after its reservation keeps
its planned cost: conservative. The file is JSON, replaced atomically on every write, and a
ledger that cannot be read or parsed is an error, never an empty history.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.accounting import Step
from common.errors import RefusedError
from common.fileio import atomic_write

log = logging.getLogger(__name__)

LEDGER_FORMAT = "idc-fl privacy ledger"
LEDGER_VERSION = 2  # 1 kept one history per data-set fingerprint; read as one history
RESERVED, SPENT = "reserved", "spent"


class LedgerError(RefusedError, RuntimeError):
    """The ledger cannot be read, parsed or written, or is missing; privacy fails closed."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class LedgerEntry:
    """One DP training round of the site: its accountant history, and facts about it.

    ``status`` is ``reserved`` from the moment the round passed the site's checks until its
    steps are known, then ``spent``; both count in full.
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    fingerprint: str = ""  # the data set trained on: information, not the budget's key
    status: str = SPENT
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id must be a non-empty string, got {self.run_id!r}")
        if not _count(self.round, 0):
            raise ValueError(f"round must be an integer >= 0, got {self.round!r}")
        if not (_number(self.noise_multiplier) and 0 <= self.noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (_number(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not _count(self.steps, 0):
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (_number(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.status not in (RESERVED, SPENT):
            raise ValueError(f"status must be {RESERVED!r} or {SPENT!r}, got {self.status!r}")
        if not all(isinstance(v, str) for v in (self.fingerprint, self.id, self.time)):
            raise ValueError("fingerprint, id and time must be strings")

    @property
    def step(self) -> Step:
        """The accountant history entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Refusal:
    """A round the site refused to train (budget spent, no DP, ...): no weights were sent."""

    run_id: str
    round: int
    reason: str
    time: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not isinstance(self.reason, str):
            raise ValueError(
                f"run_id and reason must be strings, got {self.run_id!r}, {self.reason!r}"
            )
        if not _count(self.round, 0):
            raise ValueError(f"round must be an integer >= 0, got {self.round!r}")


def history(entries: list[LedgerEntry]) -> list[Step]:
    """The accountant history of ``entries``."""
    return [e.step for e in entries]


class PrivacyLedger:
    """The site's DP history in one JSON file in its state folder.

    Every call reads the file afresh, so two objects on one path (a restart, a second run)
    always see the same history.

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
            return {
                "format": LEDGER_FORMAT,
                "version": LEDGER_VERSION,
                "rounds": [],
                "refusals": [],
            }
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be read: {exc}") from exc
        try:
            data = _upgrade(json.loads(text))
            data["rounds"] = [LedgerEntry(**row) for row in data["rounds"]]
            data["refusals"] = [Refusal(**row) for row in data["refusals"]]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is corrupt ({exc}); refusing to treat it as "
                "empty. Restore it from a backup; deleting it resets the site's privacy budget."
            ) from exc
        return data

    def exists(self) -> bool:
        """Whether the ledger file is there (a missing one reads as an empty history)."""
        return self.path.exists()

    def entries(self) -> list[LedgerEntry]:
        """Every DP round of the site, reserved or spent, oldest first."""
        rounds: list[LedgerEntry] = self._load()["rounds"]
        return rounds

    def refusals(self) -> list[Refusal]:
        """Every refused round, oldest first."""
        refusals: list[Refusal] = self._load()["refusals"]
        return refusals

    # -- writing -----------------------------------------------------------------------

    def reserve(self, entry: LedgerEntry, check: Callable[[list[LedgerEntry]], object]) -> None:
        """Append ``entry`` as reserved if ``check(entries)`` returns, all under the lock.

        ``check`` sees the history as it is on disk under the lock and raises to refuse
        (for example :class:`~common.accounting.BudgetExceeded`); nothing is written then.
        """
        with self._locked():
            data = self._load()
            check(data["rounds"])
            data["rounds"].append(replace(entry, status=RESERVED))
            self._write(data)
        log.info("privacy ledger %s: reserved %s", self.path, entry)

    def settle(self, entry_id: str, steps: int) -> LedgerEntry:
        """Record the steps a reserved round took (at most its planned steps); return it."""
        with self._locked():
            data = self._load()
            found = [i for i, e in enumerate(data["rounds"]) if e.id == entry_id]
            if len(found) != 1:
                raise LedgerError(f"privacy ledger {self.path}: no reserved round {entry_id!r}")
            old = data["rounds"][found[0]]
            if not _count(steps, 0) or steps > old.steps:
                raise LedgerError(
                    f"round {entry_id} took {steps!r} steps, more than the {old.steps} reserved"
                )
            data["rounds"][found[0]] = new = replace(old, steps=steps, status=SPENT)
            self._write(data)
        return new

    def record(self, entry: LedgerEntry) -> None:
        """Append a finished round unconditionally (imports and tests; rounds use reserve)."""
        self.reserve(replace(entry), check=lambda _: None)
        self.settle(entry.id, entry.steps)

    def record_refusal(self, run_id: str, round: int, reason: str) -> None:
        """Record that round ``round`` of ``run_id`` was refused, and why."""
        with self._locked():
            data = self._load()
            data["refusals"].append(Refusal(run_id, round, reason))
            self._write(data)
        log.warning(
            "privacy ledger %s: refused round %s of %s: %s", self.path, round, run_id, reason
        )

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
        doc = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "rounds": [asdict(e) for e in data["rounds"]],
            "refusals": [asdict(r) for r in data["refusals"]],
        }
        text = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            atomic_write(self.path, text, mode=0o600)
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be written: {exc}") from exc


def _upgrade(data: Any) -> dict[str, Any]:
    """Check the format; a version-1 ledger (per fingerprint) becomes one site history.

    Merging every data set's rounds is the conservative reading: the site's total is the
    composition of everything it ever trained on.
    """
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise ValueError("not a privacy ledger")
    if data.get("version") == 1:
        if not isinstance(data["datasets"], dict):
            raise ValueError("'datasets' is not an object")
        rounds, refusals = [], []
        for fp, rec in data["datasets"].items():
            rounds += [{**row, "fingerprint": fp} for row in rec["rounds"]]
            refusals += list(rec["refusals"])
        data = {"rounds": sorted(rounds, key=_time), "refusals": sorted(refusals, key=_time)}
    elif data.get("version") != LEDGER_VERSION:
        raise ValueError(f"unsupported ledger version {data.get('version')!r}")
    if not isinstance(data["rounds"], list) or not isinstance(data["refusals"], list):
        raise ValueError("'rounds' and 'refusals' must be lists")
    return data


def _time(row: Any) -> str:
    return str(row.get("time", "")) if isinstance(row, dict) else ""
