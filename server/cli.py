"""idc-server: what the coordinator runs (deployment flags only)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_util import add_command, dispatch, new_parser
from common.errors import EXIT_CHECK_FAILED, EXIT_OK
from common.fileio import atomic_write
from common.paths import CoordPaths, SitePaths

if TYPE_CHECKING:
    from common.audit import AuditLog


def _open_audit(paths: CoordPaths) -> AuditLog:
    from server.ops import open_audit

    return open_audit(paths)


@contextlib.contextmanager
def _registry_change(paths: CoordPaths, name: str) -> Iterator[AuditLog]:
    """Registry and audit entry together or not at all: a failed entry undoes the change.

    The log is opened first (a damaged or busy log refuses before anything changes); the
    registry files are restored when the body (the change, then its entry) raises.
    """
    saved = {
        p: p.read_bytes() if p.is_file() else None for p in (paths.sites, paths.site_key(name))
    }
    with _open_audit(paths) as audit:
        try:
            yield audit
        except BaseException:
            for path, data in saved.items():
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write(path, data, mode=0o600)
            raise


def _init(args: argparse.Namespace) -> int:
    from common.registry import new_registry
    from flowerctl import make_tls

    paths = CoordPaths(args.dir)
    if paths.sites.exists() or paths.key.exists():
        raise FileExistsError(
            f"{args.dir} is already a coordinator folder; keep it, or give a new --dir"
        )
    args.dir.mkdir(parents=True, exist_ok=True)
    # Loopback always: the coordinator's own CLI talks to its SuperLink there.
    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    tls = make_tls(paths.tls, hosts)
    new_registry(paths)
    with _open_audit(paths) as audit:
        audit.append("coordinator.initialised", "coordinator", "ok", {"hosts": hosts})
    print(f"coordinator initialised in {args.dir}")
    print(f"give every site this CA certificate: {tls.ca_cert}")
    print(f"server certificate names: {', '.join(hosts)}")
    return EXIT_OK


def _add_site(args: argparse.Namespace) -> int:
    from common.registry import add_site

    paths = CoordPaths(args.dir).require()
    with _registry_change(paths, args.name) as audit:
        info = add_site(paths, args.name, args.key)
        audit.append("site.registered", args.name, "ok", {"fingerprint": info["fingerprint"]})
    print(f"site {args.name!r} registered (key fingerprint {info['fingerprint'][:16]}...)")
    _sync_live(paths)
    return EXIT_OK


def _sync_live(paths: CoordPaths) -> None:
    """Apply the registry to a running SuperLink now; else it applies at the next start."""
    from server.link import LIVE_FILE, connection
    from server.serve import print_sync, sync_sites

    if not (paths.root / LIVE_FILE).is_file():
        print("no SuperLink running: the registry applies when `idc-server start` runs")
        return
    from flowerctl import FlowerProcError

    try:
        report = sync_sites(paths, connection(paths))
    except (FlowerProcError, OSError) as exc:
        print(
            f"warning: could not update the running SuperLink ({exc}); the registry applies "
            "when `idc-server start` next runs",
            file=sys.stderr,
        )
        return
    print_sync(report)
    print("the running SuperLink now admits exactly the registered sites with valid keys")


def _remove_site(args: argparse.Namespace) -> int:
    from common.registry import remove_site

    paths = CoordPaths(args.dir).require()
    with _registry_change(paths, args.name) as audit:
        info = remove_site(paths, args.name)
        audit.append("site.removed", args.name, "ok", {"fingerprint": info["fingerprint"]})
    print(f"site {args.name!r} removed")
    _sync_live(paths)
    return EXIT_OK


def _audit_verify(args: argparse.Namespace) -> int:
    from common import keys
    from common.audit_verify import format_verify_report, verify_log

    key = args.key or CoordPaths.of_log(args.log).pub
    report = verify_log(args.log, keys.load_public_key(key))
    print(format_verify_report(report))
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _cross_check(args: argparse.Namespace) -> int:
    from common import keys
    from common.audit_verify import cross_check, format_cross_check

    server_key = args.server_key or CoordPaths.of_log(args.server_log).pub
    site_key = args.site_key or SitePaths.of_log(args.site_log).pub
    report = cross_check(
        args.server_log,
        keys.load_public_key(server_key),
        args.site_log,
        keys.load_public_key(site_key),
        args.site,
    )
    print(format_cross_check(report))
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _add_audit(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="check audit logs")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = add_command(asub, "verify", _audit_verify, "check the hash chain and every signature")
    p.add_argument("log", type=Path)
    p.add_argument(
        "--key",
        type=Path,
        default=None,
        help="public key (default COORD_DIR/coordinator.pub beside audit/)",
    )
    p = add_command(
        asub, "cross-check", _cross_check, "match a site's sent updates with those received"
    )
    p.add_argument("server_log", type=Path)
    p.add_argument("site_log", type=Path)
    p.add_argument("--site", required=True, help="the site's registered name")
    p.add_argument("--server-key", type=Path, default=None)
    p.add_argument("--site-key", type=Path, default=None)


def build_parser() -> argparse.ArgumentParser:
    """The idc-server argument parser."""
    parser, sub = new_parser("idc-server", __doc__, cache=False)
    p = add_command(sub, "init", _init, "create the CA, server certificate and coordinator state")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="name or address the certificate names (repeatable)",
    )
    p = add_command(sub, "add-site", _add_site, "register a hospital's public key")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--key", type=Path, required=True, help="the site's site.pub")
    p = add_command(sub, "remove-site", _remove_site, "remove a hospital")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--name", required=True)
    _add_audit(sub)
    from server import runner

    runner.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-server``."""
    args = build_parser().parse_args(argv)
    return dispatch(args, "idc-server")


if __name__ == "__main__":
    sys.exit(main())
