"""Which run apps a site runs: its installed idc-fl, plus app hashes it approved by hand.

The site's executor (:mod:`client.executor`) accepts a run when the run's app bundle (FAB) is
the installed app file for file (:class:`flowerctl.fab.InstalledApp`), or when the bundle's hash
is in ``SITE_DIR/approved-apps.json``, written only by ``idc-client approve`` on the site's own
machine. Either way the site runs its *installed* ClientApp; an approval says "runs of that
bundle may use my data", never "run its code". A damaged approvals file approves nothing (the
executor then refuses every app but the installed one, and says why).
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.cli_util import add_command
from common.fileio import atomic_write, read_json
from common.paths import SitePaths

APP_APPROVED = "app.approved"  # `approve`; the executor's two actions live in common.audit
_HASH = re.compile(r"^[0-9a-f]{64}$")


class ApprovalsError(ValueError):
    """The approvals file cannot be read; nothing counts as approved then."""


def load_approved(site_dir: Path) -> dict[str, dict[str, Any]]:
    """The hand-approved FAB hashes of a site, each with when and why it was approved."""
    path = SitePaths(Path(site_dir)).approvals
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        approved = data["approved"]
        if not isinstance(approved, dict) or not all(_HASH.match(h) for h in approved):
            raise ValueError("'approved' must map 64-hex-digit app hashes to records")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApprovalsError(
            f"{path} is damaged ({exc}): fix or delete it, then `idc-client approve` again"
        ) from exc
    return dict(approved)


def approve(site_dir: Path, fab_hash: str, note: str) -> dict[str, Any]:
    """Record ``fab_hash`` as approved (audit first: no approval the audit log does not hold)."""
    from common import keys
    from common.audit import AuditError, AuditLog

    fab_hash = fab_hash.strip().lower()
    if not _HASH.match(fab_hash):
        raise ValueError(f"HASH {fab_hash!r} is not an app hash (64 hex digits, sha256 of the FAB)")
    paths = SitePaths(Path(site_dir)).require()
    approved = load_approved(site_dir)
    record = {"approved_at": datetime.now(UTC).isoformat(timespec="seconds"), "note": note}
    name = str(read_json(paths.info)["site-name"])
    key = keys.load_private_key(paths.key)
    try:
        with AuditLog(paths.audit, key, actor=name) as audit:
            audit.append(APP_APPROVED, fab_hash, "ok", {"app_hash": fab_hash, "note": note})
    except AuditError as exc:  # no audit entry, no approval
        busy = "already open" in str(exc)
        raise ValueError(f"{exc}{': try again in a moment' if busy else ''}") from exc
    approved[fab_hash] = record
    payload = {"approved": approved}
    atomic_write(paths.approvals, (json.dumps(payload, indent=2) + "\n").encode())
    return record


def _approve(args: argparse.Namespace) -> int:
    approve(args.dir, args.hash, args.note)
    print(f"app {args.hash.strip().lower()} approved for runs at this site (recorded in its audit)")
    print("the site still runs its installed ClientApp for it, never the app's own code")
    return 0


def add_approve_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-client approve``."""
    p = add_command(
        sub, "approve", _approve, "let runs of one more app (by FAB hash) use this site"
    )
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("hash", help="the app's FAB hash (sha256, as the site's audit log names it)")
    p.add_argument("--note", default="", help="why (kept with the approval and in the audit)")
