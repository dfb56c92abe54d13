"""idc-client: what a hospital runs (deployment flags only; training settings come from the run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_util import add_audit_commands, add_command, dispatch, new_parser
from common.data import LoadOptions, load_patches
from common.errors import EXIT_CHECK_FAILED, EXIT_OK
from common.paths import SitePaths, check_name

if TYPE_CHECKING:
    from common.keys import PublicKey


def _check(args: argparse.Namespace) -> int:
    options = LoadOptions(small=args.small)
    patches = load_patches(args.data, cache_dir=args.cache_dir, options=options, workers=2)
    report = patches.report
    print(report.summary())
    for title, items in (
        ("unreadable", report.unreadable),
        ("mislabelled", report.mislabelled),
        ("ignored", report.ignored),
        ("no label", report.no_label),
    ):
        for rel in items[: args.list]:
            print(f"  {title}: {rel}")
        if len(items) > args.list:
            print(f"  ... and {len(items) - args.list} more {title}")
    print(f"data set fingerprint: {patches.fingerprint}")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    from common import keys
    from common.fileio import atomic_write, private_dir

    check_name(args.name)
    paths = SitePaths(args.dir)
    if paths.info.exists() or paths.key.exists():
        raise FileExistsError(
            f"{args.dir} is already a site folder; keep it, or give a new --dir for a new site"
        )
    private_dir(args.dir)  # the site key, audit log, ledger and patch cache: owner-only
    keys.generate_key_pair(paths.key, paths.pub)
    atomic_write(paths.info, (json.dumps({"site-name": args.name}) + "\n").encode())
    print(f"site {args.name!r} initialised in {args.dir}")
    print(f"send this public key to the coordinator: {paths.pub}")
    print(f"  (fingerprint {keys.public_key_fingerprint(keys.load_public_key(paths.pub))})")
    print(f"keep this private key secret, never send it: {paths.key}")
    if args.coordinator_key is not None:
        return _trust(args)
    return EXIT_OK


def _trust(args: argparse.Namespace) -> int:
    from client.trust import pin_coordinator

    fingerprint = pin_coordinator(args.dir, args.coordinator_key, getattr(args, "replace", False))
    print(f"coordinator key pinned: fingerprint {fingerprint} (compare it with the coordinator's)")
    return EXIT_OK


def _privacy(args: argparse.Namespace) -> int:
    from client.private import check_ledger, ledger_report
    from client.sitestate import StartSettings
    from client.status import privacy_lines
    from common.privacy import PRIVACY_UNIT

    check_ledger(args.dir)  # a lost ledger is an error here too, never "no DP yet"
    settings = StartSettings.read(args.dir)
    path = SitePaths(args.dir).ledger
    if not path.is_file():
        print(f"no privacy ledger at {path}: this site has not trained with DP yet")
    else:
        delta = args.delta if args.delta is not None else (settings and settings.delta)
        print(ledger_report(args.dir, delta=delta or None))
    print()
    for line in privacy_lines(args.dir, settings):
        print(line)
    print()
    print(PRIVACY_UNIT)
    return EXIT_OK


def _log_key(args: argparse.Namespace) -> tuple[PublicKey, str]:
    """The key a log is checked against, never one found beside the log (client.trust)."""
    from client.trust import own_key, pinned_coordinator
    from common import keys

    if args.key is not None:
        return keys.load_public_key(args.key), f"given: {args.key}"
    if args.coordinator:
        return pinned_coordinator(args.dir), "the coordinator key pinned at enrolment"
    return own_key(args.dir), "this site's signing key"


def _audit_verify(args: argparse.Namespace) -> int:
    from common.audit_verify import format_verify_report, parse_head, verify_log

    expect = parse_head(args.expect_head) if args.expect_head else None
    key, source = _log_key(args)
    report = verify_log(args.log, key, expect_head=expect)
    print(f"{format_verify_report(report, key)} ({source})")
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _cross_check(args: argparse.Namespace) -> int:
    from client.trust import own_key, pinned_coordinator, read_site
    from common.audit_verify import cross_check, format_cross_check

    name = str(read_site(args.dir)["site-name"])
    coordinator, mine = pinned_coordinator(args.dir), own_key(args.dir)
    report = cross_check(args.coordinator_log, coordinator, args.site_log, mine, name)
    print(
        format_cross_check(report, [("coordinator (pinned)", coordinator), (f"site {name}", mine)])
    )
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _add_audit(sub: argparse._SubParsersAction) -> None:
    _, keys_from, cross = add_audit_commands(
        sub, _audit_verify, _cross_check, "the site's state folder"
    )
    keys_from.add_argument(
        "--coordinator",
        action="store_true",
        help="the log is the coordinator's: check it with the key pinned at enrolment",
    )
    cross.add_argument("coordinator_log", type=Path, help="the coordinator's audit log")
    cross.add_argument("site_log", type=Path, help="this site's audit log")


def _add_management(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "init", _init, "make this site's key pair (send the .pub to the coordinator)"
    )
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--name", required=True, help="the site's name, as the coordinator knows it")
    p.add_argument(
        "--coordinator-key",
        type=Path,
        default=None,
        help="the coordinator's coordinator.pub received at enrolment: pinned to verify its log",
    )
    p = add_command(sub, "trust", _trust, "pin the coordinator's public key (to verify its log)")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--coordinator-key", type=Path, required=True, help="its coordinator.pub")
    p.add_argument("--replace", action="store_true", help="replace a different pinned key")
    p = add_command(sub, "privacy", _privacy, "privacy ledger: epsilon spent, cap, what is left")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--delta", type=float, default=None, help="delta for the totals")
    _add_audit(sub)


def build_parser() -> argparse.ArgumentParser:
    """The idc-client argument parser."""
    parser, sub = new_parser("idc-client", __doc__)
    p = add_command(sub, "check", _check, "preflight: what is usable in a data folder")
    p.add_argument("--data", type=Path, required=True, help="folder in the Kaggle layout")
    p.add_argument(
        "--small",
        choices=("pad", "skip"),
        default="pad",
        help="patches under 50x50: pad with background (default) or skip",
    )
    p.add_argument("--list", type=int, default=10, help="how many problem files to name")
    _add_management(sub)
    from client import approvals, predict_cli, runner, status

    runner.add_start_parser(sub)
    status.add_status_parser(sub)
    approvals.add_approve_parser(sub)
    predict_cli.add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-client``."""
    args = build_parser().parse_args(argv)
    return dispatch(args, "idc-client")


if __name__ == "__main__":
    sys.exit(main())
