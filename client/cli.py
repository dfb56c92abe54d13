"""idc-client: what a hospital runs (deployment flags only; training settings come from the run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli_util import dispatch, new_parser
from common.data import LoadOptions, NoUsableData, load_patches


def _check(args: argparse.Namespace) -> int:
    options = LoadOptions(small=args.small)
    try:
        patches = load_patches(args.data, cache_dir=args.cache_dir, options=options, workers=2)
    except NoUsableData as exc:
        print(f"idc-client check: {exc}", file=sys.stderr)
        return 1
    report = patches.report
    print(report.summary())
    for title, items in (
        ("unreadable", report.unreadable),
        ("mislabelled", report.mislabelled),
        ("ignored", report.ignored),
    ):
        for rel in items[: args.list]:
            print(f"  {title}: {rel}")
        if len(items) > args.list:
            print(f"  ... and {len(items) - args.list} more {title}")
    print(f"data set fingerprint: {patches.fingerprint}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from client.site import site_paths
    from common import keys
    from common.fileio import private_dir
    from server.registry import check_name

    check_name(args.name)
    private_dir(args.dir)  # the site key, audit log, ledger and patch cache: owner-only
    private, public = site_paths(args.dir)
    keys.generate_key_pair(private, public)
    (args.dir / "site.json").write_text(json.dumps({"site-name": args.name}) + "\n")
    print(f"site {args.name!r} initialised in {args.dir}")
    print(f"send this public key to the coordinator: {public}")
    print(f"keep this private key secret, never send it: {private}")
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from client.private import LEDGER_FILE
    from common.ledger import PrivacyLedger
    from common.privacy import PRIVACY_UNIT

    path = args.dir / LEDGER_FILE
    if not path.is_file():
        print(f"no privacy ledger at {path}: this site has not trained with DP yet")
        return 0
    print(PrivacyLedger(path).format(delta=args.delta))
    print()
    print(PRIVACY_UNIT)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from client.site import SITE_PUB
    from common import keys
    from common.audit_verify import format_verify_report, verify_log

    key = args.key or (args.log.parents[1] / SITE_PUB)
    report = verify_log(args.log, keys.load_public_key(key))
    print(format_verify_report(report))
    return 0 if report.ok else 1


def _add_management(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="make this site's key pair (send the .pub to the coordinator)")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--name", required=True, help="the site's name, as the coordinator knows it")
    p.set_defaults(func=_init)
    p = sub.add_parser("privacy", help="print the privacy ledger: epsilon spent per data set")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--delta", type=float, default=None, help="delta for the totals")
    p.set_defaults(func=_privacy)
    audit = sub.add_parser("audit", help="check the site's audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = asub.add_parser("verify", help="check the hash chain and every signature")
    p.add_argument("log", type=Path, help="the audit log (SITE_DIR/audit/site-audit.jsonl)")
    p.add_argument("--key", type=Path, default=None, help="public key (default SITE_DIR/site.pub)")
    p.set_defaults(func=_audit_verify)


def build_parser() -> argparse.ArgumentParser:
    """The idc-client argument parser."""
    parser, sub = new_parser("idc-client", __doc__)
    p = sub.add_parser("check", help="preflight: what is usable in a data folder")
    p.add_argument("--data", type=Path, required=True, help="folder in the Kaggle layout")
    p.add_argument(
        "--small",
        choices=("pad", "skip"),
        default="pad",
        help="patches under 50x50: pad with background (default) or skip",
    )
    p.add_argument("--list", type=int, default=10, help="how many problem files to name")
    p.set_defaults(func=_check)
    _add_management(sub)
    from client import predict, runner

    runner.add_start_parser(sub)
    predict.add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-client``."""
    args = build_parser().parse_args(argv)
    return dispatch(args, "idc-client", (ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
