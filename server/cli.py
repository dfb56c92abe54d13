"""idc-server: what the coordinator runs (deployment flags only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_util import dispatch, new_parser

if TYPE_CHECKING:
    from common.keys import PublicKey
    from server.registry import CoordPaths


def _open_audit(paths: object) -> object:
    from common import keys
    from common.audit import AuditLog

    return AuditLog(paths.audit, keys.load_private_key(paths.key), "coordinator")  # type: ignore[attr-defined]


def _init(args: argparse.Namespace) -> int:
    from common import keys
    from flowerctl import make_tls
    from server.registry import CoordPaths, save_sites

    paths = CoordPaths(args.dir)
    if paths.sites.exists():
        raise ValueError(f"{args.dir} is already a coordinator folder")
    from common.fileio import private_dir

    private_dir(args.dir)  # CA key, signing key, SuperLink database, audit log: owner-only
    # Loopback always: the coordinator's own CLI talks to its SuperLink there.
    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    tls = make_tls(paths.tls, hosts)
    keys.generate_key_pair(paths.key, paths.pub)
    save_sites(paths, {})
    with _open_audit(paths) as audit:  # type: ignore[attr-defined]
        audit.append("coordinator.initialised", "coordinator", "ok", {"hosts": hosts})
    print(f"coordinator initialised in {args.dir}")
    print(f"give every site this CA certificate: {tls.ca_cert}")
    print(
        f"and this coordinator key: {paths.pub} (fingerprint "
        f"{keys.public_key_fingerprint(keys.load_public_key(paths.pub))}); sites pin it with "
        "`idc-client trust` to verify this coordinator's audit log"
    )
    print(f"server certificate names: {', '.join(hosts)}")
    return 0


def _add_site(args: argparse.Namespace) -> int:
    from server.registry import CoordPaths, add_site

    paths = CoordPaths(args.dir).require()
    info = add_site(paths, args.name, args.key, args.patches)
    details = {"fingerprint": info["fingerprint"], "patches": info.get("patches")}
    with _open_audit(paths) as audit:  # type: ignore[attr-defined]
        audit.append("site.registered", args.name, "ok", details)
    bound = f", at most {args.patches} examples per update" if args.patches else ""
    print(f"site {args.name!r} registered (key fingerprint {info['fingerprint']}{bound})")
    _sync_live(paths)
    return 0


def _sync_live(paths: object) -> None:
    """Apply the registry to a running SuperLink now; else it applies at the next start."""
    from server.runner import LIVE_FILE, connection, sync_sites

    if not (paths.root / LIVE_FILE).is_file():  # type: ignore[attr-defined]
        print("no SuperLink running: the registry applies when `idc-server start` runs")
        return
    from flowerctl import FlowerProcError

    try:
        sync_sites(paths, connection(paths))  # type: ignore[arg-type]
    except (FlowerProcError, OSError) as exc:
        print(
            f"warning: could not update the running SuperLink ({exc}); the registry applies "
            "when `idc-server start` next runs",
            file=sys.stderr,
        )
        return
    print("the running SuperLink now admits exactly the registered sites")


def _remove_site(args: argparse.Namespace) -> int:
    from server.registry import CoordPaths, remove_site

    paths = CoordPaths(args.dir).require()
    info = remove_site(paths, args.name)
    with _open_audit(paths) as audit:  # type: ignore[attr-defined]
        audit.append("site.removed", args.name, "ok", {"fingerprint": info["fingerprint"]})
    print(f"site {args.name!r} removed")
    _sync_live(paths)
    return 0


def _pinned_key(
    args: argparse.Namespace, paths: CoordPaths, site: str | None
) -> tuple[PublicKey, str]:
    """The key a log is checked against, and where it comes from: never from beside the log.

    An explicit ``--key`` file; else a site's key as registered (``--site``); else the public
    half of this coordinator's own signing key in ``--dir``.
    """
    from common import keys
    from server.registry import site_public_keys

    if args.key is not None:
        return keys.load_public_key(args.key), f"given: {args.key}"
    if site is not None:
        registered = site_public_keys(paths)
        if site not in registered:
            raise ValueError(f"--site {site!r} is not registered (known: {sorted(registered)})")
        return registered[site], f"registered for site {site!r}"
    own = keys.load_private_key(paths.key).public_key()
    return own, "this coordinator's signing key"


def _audit_verify(args: argparse.Namespace) -> int:
    from common.audit_verify import format_verify_report, parse_head, verify_log
    from server.registry import CoordPaths

    paths = CoordPaths(args.dir).require()
    expect = parse_head(args.expect_head) if args.expect_head else None
    key, source = _pinned_key(args, paths, args.site)
    report = verify_log(args.log, key, expect_head=expect)
    print(f"{format_verify_report(report, key)} ({source})")
    return 0 if report.ok else 1


def _cross_check(args: argparse.Namespace) -> int:
    from common import keys
    from common.audit_verify import cross_check, format_cross_check
    from server.registry import CoordPaths

    paths = CoordPaths(args.dir).require()
    args.key = args.server_key
    server_key, _ = _pinned_key(args, paths, None)
    args.key = args.site_key
    site_key, _ = _pinned_key(args, paths, args.site)
    report = cross_check(args.server_log, server_key, args.site_log, site_key, args.site)
    print(format_cross_check(report))
    for label, key in (("coordinator", server_key), (f"site {args.site}", site_key)):
        print(f"  {label} key {keys.public_key_fingerprint(key)}")
    return 0 if report.ok else 1


def _add_audit(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="check audit logs with pinned keys")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = asub.add_parser("verify", help="check the hash chain and every signature")
    p.add_argument("log", type=Path)
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--site", default=None, help="a site's log: its registered key checks it")
    who.add_argument("--key", type=Path, default=None, help="check with this public key file")
    p.add_argument(
        "--expect-head",
        default=None,
        metavar="SEQ:HASH",
        help="a head recorded earlier (printed by verify): detects truncation and rewrites",
    )
    p.set_defaults(func=_audit_verify)
    p = asub.add_parser("cross-check", help="match a site's sent updates with those received")
    p.add_argument("server_log", type=Path)
    p.add_argument("site_log", type=Path)
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument("--site", required=True, help="the site's registered name")
    p.add_argument("--server-key", type=Path, default=None, help="default: this coordinator's")
    p.add_argument(
        "--site-key", type=Path, default=None, help="default: the key registered for --site"
    )
    p.set_defaults(func=_cross_check)


def build_parser() -> argparse.ArgumentParser:
    """The idc-server argument parser."""
    parser, sub = new_parser("idc-server", __doc__, cache=False)
    p = sub.add_parser("init", help="create the CA, server certificate and coordinator state")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="name or address the certificate names (repeatable)",
    )
    p.set_defaults(func=_init)
    p = sub.add_parser("add-site", help="register a hospital's public key")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--key", type=Path, required=True, help="the site's site.pub")
    p.add_argument(
        "--patches",
        type=int,
        default=None,
        help="patches the site declared (idc-client check prints it): the most examples "
        "its updates may claim (default: the run's max-examples-per-site)",
    )
    p.set_defaults(func=_add_site)
    p = sub.add_parser("remove-site", help="remove a hospital")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.set_defaults(func=_remove_site)
    _add_audit(sub)
    from server import runner

    runner.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-server``."""
    args = build_parser().parse_args(argv)
    errors = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)
    return dispatch(args, "idc-server", errors)


if __name__ == "__main__":
    sys.exit(main())
