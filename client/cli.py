"""idc-client: what a hospital runs (deployment flags only; training settings come from the run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli_util import add_command, dispatch, new_parser
from common.data import LoadOptions, load_patches
from common.errors import EXIT_CHECK_FAILED, EXIT_OK
from common.paths import SitePaths, check_name


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
    from common.fileio import atomic_write

    check_name(args.name)
    paths = SitePaths(args.dir)
    if paths.info.exists() or paths.key.exists():
        raise FileExistsError(
            f"{args.dir} is already a site folder; keep it, or give a new --dir for a new site"
        )
    args.dir.mkdir(parents=True, exist_ok=True)
    keys.generate_key_pair(paths.key, paths.pub)
    atomic_write(paths.info, (json.dumps({"site-name": args.name}) + "\n").encode())
    print(f"site {args.name!r} initialised in {args.dir}")
    print(f"send this public key to the coordinator: {paths.pub}")
    print(f"keep this private key secret, never send it: {paths.key}")
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


def _audit_verify(args: argparse.Namespace) -> int:
    from common import keys
    from common.audit_verify import format_verify_report, verify_log

    key = args.key or SitePaths.of_log(args.log).pub
    report = verify_log(args.log, keys.load_public_key(key))
    print(format_verify_report(report))
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _add_management(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "init", _init, "make this site's key pair (send the .pub to the coordinator)"
    )
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--name", required=True, help="the site's name, as the coordinator knows it")
    p = add_command(sub, "privacy", _privacy, "privacy ledger: epsilon spent, cap, what is left")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--delta", type=float, default=None, help="delta for the totals")
    audit = sub.add_parser("audit", help="check the site's audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = add_command(asub, "verify", _audit_verify, "check the hash chain and every signature")
    p.add_argument("log", type=Path, help="the audit log (SITE_DIR/audit/site-audit.jsonl)")
    p.add_argument("--key", type=Path, default=None, help="public key (default SITE_DIR/site.pub)")


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
    from client import approvals, predict, runner, status

    runner.add_start_parser(sub)
    status.add_status_parser(sub)
    approvals.add_approve_parser(sub)
    predict.add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-client``."""
    args = build_parser().parse_args(argv)
    return dispatch(args, "idc-client")


if __name__ == "__main__":
    sys.exit(main())
