"""Verification of audit logs as one chain across rotated files, and site/coordinator cross-checks.

:func:`verify_log` reads ``<name>.1``, ``<name>.2``, ... then ``<name>`` and checks, line by
line: canonical JSON with the right fields; ``seq`` consecutive from 0; ``prev`` equal to the
previous entry's hash (:data:`common.audit.GENESIS` first); the signature under the given
public key; ``time`` never decreasing. It stops at the first bad line and names it. A partial
last line (a torn write) fails, and so does a log with no entry at all; whole lines cut
cleanly off the end do not, unless a head recorded elsewhere is passed as ``expect_head`` (see
:mod:`common.audit` for this limit).

The key decides what "verified" means: a log rewritten and re-signed with a new key verifies
under that new key. Callers pass a *pinned* key (the coordinator's registry for a site's log,
the fingerprint a site received at enrolment for the coordinator's), never one found beside
the log, and show its fingerprint with the result (:func:`format_verify_report`).

:func:`cross_check` verifies both logs, then matches the site's ``update.sent`` events against
the coordinator's ``update.received`` events for that site, by ``(run_id, round)`` and digest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from common import keys
from common.audit import UPDATE_RECEIVED, UPDATE_SENT, LogHead
from common.audit_format import (
    GENESIS,
    entry_hash,
    parse_entry,
    parse_time,
    rotated_files,
    signing_bytes,
)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_log`.

    Attributes
    ----------
    ok : bool
        Whether every entry checked out (and ``expect_head``, if given, matched).
    entries : int
        How many entries verified before the first bad one (all of them when ``ok``).
    first_bad : int or None
        1-based position of the first bad entry in the whole chain (equal to its expected
        ``seq`` + 1), or None.
    file : Path or None
        The file holding the first bad entry, or None.
    line : int or None
        Its 1-based line number within ``file``, or None.
    reason : str
        What was wrong, or a summary when ``ok``.
    last_seq, last_hash : int or str or None
        Head of the verified part of the chain; record it elsewhere to detect truncation later.
    """

    ok: bool
    entries: int
    first_bad: int | None
    file: Path | None
    reason: str
    line: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None

    @property
    def head(self) -> LogHead | None:
        """``(last_seq, last_hash)`` as a :class:`LogHead`, or None for an empty chain."""
        if self.last_seq is None or self.last_hash is None:
            return None
        return LogHead(self.last_seq, self.last_hash)


@dataclass(frozen=True)
class CrossCheckReport:
    """Outcome of :func:`cross_check`: ``matched`` updates agree; ``problems`` lists the rest."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    matched: int = 0


def chain_files(path: Path) -> list[Path]:
    """Return the files of the log at ``path`` in chain order: rotated ones, then the live one."""
    path = Path(path)
    files = [file for _, file in rotated_files(path)]
    return files + [path] if path.exists() else files


def iter_entries(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the parsed entries of a log in chain order, without verifying the chain.

    Raises
    ------
    ValueError
        If a line does not parse; the message names the file and line.
    """
    for file in chain_files(path):
        with file.open("rb") as handle:
            for line_no, line in enumerate(handle, 1):
                try:
                    yield parse_entry(line)
                except ValueError as exc:
                    raise ValueError(f"{file} line {line_no}: {exc}") from None


class _Chain:
    """Running state while walking a chain: what the next entry must look like."""

    def __init__(self, public_key: keys.PublicKey) -> None:
        self.public_key = public_key
        self.entries = 0
        self.prev = GENESIS
        self.last_time: datetime | None = None
        self.hashes: dict[int, tuple[str, Path, int]] = {}

    def check(self, line: bytes) -> tuple[str | None, dict[str, Any] | None]:
        """Return ``(reason, None)`` if ``line`` cannot come next, else ``(None, entry)``."""
        try:
            entry = parse_entry(line)
        except ValueError as exc:
            return str(exc), None
        if entry["seq"] != self.entries:
            return (
                f"seq is {entry['seq']} but {self.entries} was expected "
                "(an entry was removed, reordered or inserted)",
                None,
            )
        if entry["prev"] != self.prev:
            return "prev does not match the hash of the previous entry", None
        if not keys.verify(self.public_key, signing_bytes(entry), entry["sig"]):
            return (
                "signature does not verify with the given public key "
                "(entry edited, forged, or signed with another key)",
                None,
            )
        moment = parse_time(entry["time"])
        if self.last_time is not None and moment < self.last_time:
            return f"time {entry['time']} is earlier than the previous entry's", None
        return None, entry

    def advance(self, entry: dict[str, Any], file: Path, line_no: int, keep: int | None) -> None:
        self.prev = entry_hash(entry)
        if keep is not None and entry["seq"] == keep:
            self.hashes[keep] = (self.prev, file, line_no)
        self.last_time = parse_time(entry["time"])
        self.entries += 1


def verify_log(
    path: Path, public_key: keys.PublicKey, *, expect_head: LogHead | None = None
) -> VerifyReport:
    """Verify the whole chain of the log at ``path`` with its owner's ``public_key``.

    Parameters
    ----------
    path : Path
        The live log file; its rotated files ``<name>.<N>`` are read first.
    public_key : keys.PublicKey
        The log owner's public key.
    expect_head : LogHead, optional
        A head recorded earlier outside the log. The log must still hold that entry, with
        that hash; this is what detects lines cut cleanly off the end, or a rewritten log.

    Returns
    -------
    VerifyReport
        The first bad entry, or the count and head of a good chain.
    """
    path = Path(path)
    if expect_head is not None and expect_head.seq < 0:
        raise ValueError(f"expect_head seq must be >= 0, got {expect_head.seq}")
    files = chain_files(path)
    if not files:
        return VerifyReport(False, 0, None, path, f"no audit log at {path}")
    chain = _Chain(public_key)
    keep = expect_head.seq if expect_head is not None else None
    for file in files:
        try:
            with file.open("rb") as handle:
                for line_no, line in enumerate(handle, 1):
                    reason, entry = chain.check(line)
                    if entry is None:
                        return _bad(chain, file, line_no, f"{reason}{_gap_note(path)}")
                    chain.advance(entry, file, line_no, keep)
        except OSError as exc:
            return _bad(chain, file, None, f"cannot read {file}: {exc}")
    if expect_head is not None:
        if expect_head.seq >= chain.entries:
            return _bad(
                chain,
                files[-1],
                None,
                f"log ends at entry {chain.entries} but a recorded head says seq "
                f"{expect_head.seq} existed: entries were cut off the end",
            )
        recorded, file, line_no = chain.hashes[expect_head.seq]
        if recorded != expect_head.hash:
            reason = f"entry seq {expect_head.seq} differs from the recorded head: log rewritten"
            return VerifyReport(False, expect_head.seq, expect_head.seq + 1, file, reason, line_no)
    if chain.entries == 0:
        # Every log starts with its owner's first event: an empty chain proves nothing.
        return _bad(chain, files[-1], None, "the log holds no entries (emptied or never written)")
    last_seq, last_hash = chain.entries - 1, chain.prev
    summary = f"{chain.entries} entries verified in {len(files)} file(s)"
    return VerifyReport(True, chain.entries, None, None, summary, None, last_seq, last_hash)


def _bad(chain: _Chain, file: Path, line_no: int | None, reason: str) -> VerifyReport:
    last_seq = chain.entries - 1 if chain.entries else None
    last_hash = chain.prev if chain.entries else None
    return VerifyReport(
        False, chain.entries, chain.entries + 1, file, reason, line_no, last_seq, last_hash
    )


def _gap_note(path: Path) -> str:
    numbers = [number for number, _ in rotated_files(path)]
    missing = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))
    if not missing:
        return ""
    names = ", ".join(f"{path.name}.{number}" for number in missing)
    return f" (rotated file(s) missing: {names})"


def cross_check(
    server_log: Path,
    server_pub: keys.PublicKey,
    site_log: Path,
    site_pub: keys.PublicKey,
    site_name: str,
) -> CrossCheckReport:
    """Check that a site's log and the coordinator's log tell the same story about updates.

    Both logs must verify first. Then, per ``(run_id, round)``: every ``update.sent`` in the
    site's log needs an ``update.received`` with object ``site_name`` and the same digest in
    the coordinator's log, and every such ``update.received`` needs a matching
    ``update.sent``. The event convention is in the :mod:`common.audit` docstring; in short:

    * site: action ``"update.sent"``, actor = ``site_name``, details
      ``{"run_id": str, "round": int, "digest": str}``;
    * coordinator: action ``"update.received"``, object = ``site_name``, details
      ``{"run_id": str, "round": int, "digest": str, "signature_valid": bool,
      "accepted": bool, ...}``, written for every update that arrives, accepted or not.

    Returns
    -------
    CrossCheckReport
        ``problems`` names run, round and both digests for each disagreement.
    """
    problems: list[str] = []
    for label, log, pub in (("coordinator", server_log, server_pub), ("site", site_log, site_pub)):
        report = verify_log(log, pub)
        if not report.ok:
            problems.append(f"{label} log does not verify: {format_verify_report(report)}")
    if problems:
        return CrossCheckReport(False, problems, 0)
    sent = _updates(site_log, UPDATE_SENT, None, "site", problems)
    received = _updates(server_log, UPDATE_RECEIVED, site_name, "coordinator", problems)
    problems.extend(_foreign_actors(site_log, site_name))
    matched = 0
    for run_id, rnd in sorted(sent.keys() | received.keys()):
        mine, theirs = sent.get((run_id, rnd)), received.get((run_id, rnd))
        where = f"run {run_id} round {rnd}"
        if mine == theirs:
            matched += 1
        elif theirs is None:
            problems.append(
                f"{where}: site {site_name} sent digest {mine} but the coordinator log has "
                "no update.received for it"
            )
        elif mine is None:
            problems.append(
                f"{where}: coordinator received digest {theirs} from {site_name} but the "
                "site log has no update.sent for it"
            )
        else:
            problems.append(
                f"{where}: digest mismatch: site {site_name} sent {mine}, "
                f"coordinator received {theirs}"
            )
    return CrossCheckReport(not problems, problems, matched)


def _updates(
    path: Path, action: str, site_name: str | None, label: str, problems: list[str]
) -> dict[tuple[str, int], str]:
    """Map ``(run_id, round)`` to digest for ``action`` events (for one site, if named)."""
    found: dict[tuple[str, int], str] = {}
    for entry in iter_entries(path):
        if entry["action"] != action or (site_name is not None and entry["object"] != site_name):
            continue
        details = entry.get("details", {})
        run_id, rnd, digest = (details.get(k) for k in ("run_id", "round", "digest"))
        if not (
            isinstance(run_id, str)
            and isinstance(rnd, int)
            and not isinstance(rnd, bool)
            and isinstance(digest, str)
        ):
            problems.append(
                f"{label} log seq {entry['seq']}: {action} details need run_id (str), "
                f"round (int) and digest (str), got {details}"
            )
            continue
        earlier = found.setdefault((run_id, rnd), digest)
        if earlier != digest:
            problems.append(
                f"{label} log has {action} twice for run {run_id} round {rnd} with "
                f"different digests {earlier} and {digest}"
            )
    return found


def _foreign_actors(site_log: Path, site_name: str) -> list[str]:
    actors = {e["actor"] for e in iter_entries(site_log) if e["action"] == UPDATE_SENT}
    return [
        f"site log has update.sent written by actor {actor!r}, not site {site_name!r}"
        for actor in sorted(actors - {site_name})
    ]


def parse_head(text: str) -> LogHead:
    """``SEQ:HASH`` (as a verify report prints it) as a :class:`LogHead`; ValueError if not."""
    seq, _, digest = text.partition(":")
    if not (seq.isdigit() and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(
            f"--expect-head must be SEQ:HASH (a number, ':', 64 hex digits), got {text!r}"
        )
    return LogHead(int(seq), digest)


def format_verify_report(report: VerifyReport, key: keys.PublicKey | None = None) -> str:
    """Return a one-line, human-readable summary of a :class:`VerifyReport`.

    With ``key``, the line names the fingerprint of the key the log was checked against.
    """
    with_key = f" [key {keys.public_key_fingerprint(key)}]" if key is not None else ""
    if report.ok:
        head = f"; head {report.last_seq}:{report.last_hash}" if report.entries else ""
        return f"OK: {report.reason}{head}{with_key}"
    if report.first_bad is None:
        where = "log"
    else:
        where = f"entry {report.first_bad} (seq {report.first_bad - 1}"
        where += f", {report.file}" if report.file is not None else ""
        where += f" line {report.line})" if report.line else ")"
    return (
        f"FAILED at {where}: {report.reason}; {report.entries} entries before it verified{with_key}"
    )


def format_cross_check(
    report: CrossCheckReport, checked_with: Sequence[tuple[str, keys.PublicKey]] = ()
) -> str:
    """Return a human-readable summary of a :class:`CrossCheckReport`, one problem a line.

    ``checked_with`` names each log's key (label, key): its fingerprint ends the summary.
    """
    if report.ok:
        lines = [f"OK: {report.matched} update(s) match in both logs"]
    else:
        lines = [f"FAILED: {len(report.problems)} problem(s); {report.matched} update(s) match"]
        lines += [f"  - {problem}" for problem in report.problems]
    lines += [f"  {label} key {keys.public_key_fingerprint(key)}" for label, key in checked_with]
    return "\n".join(lines)
