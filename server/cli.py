"""idc-server: what the coordinator runs (deployment flags only)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_util import add_audit_commands, add_command, dispatch, new_parser
from common.errors import EXIT_CHECK_FAILED, EXIT_OK
from common.fileio import atomic_write
from common.paths import CoordPaths

if TYPE_CHECKING:
    from common.audit import AuditLog
    from common.keys import PublicKey


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
    from common import keys
    from common.fileio import private_dir

    private_dir(args.dir)  # CA key, signing key, SuperLink database, audit log: owner-only
    # Loopback always: the coordinator's own CLI talks to its SuperLink there.
    hosts = list(dict.fromkeys([*args.host, "127.0.0.1", "localhost"]))
    tls = make_tls(paths.tls, hosts)
    new_registry(paths)
    with _open_audit(paths) as audit:
        audit.append("coordinator.initialised", "coordinator", "ok", {"hosts": hosts})
    print(f"coordinator initialised in {args.dir}")
    print(f"give every site this CA certificate: {tls.ca_cert}")
    print(
        f"and this coordinator key: {paths.pub} (fingerprint "
        f"{keys.public_key_fingerprint(keys.load_public_key(paths.pub))}); sites pin it with "
        "`idc-client trust` to verify this coordinator's audit log"
    )
    print(f"server certificate names: {', '.join(hosts)}")
    return EXIT_OK


def _add_site(args: argparse.Namespace) -> int:
    from common.registry import add_site

    paths = CoordPaths(args.dir).require()
    with _registry_change(paths, args.name) as audit:
        info = add_site(paths, args.name, args.key, args.patches)
        details = {"fingerprint": info["fingerprint"], "patches": info.get("patches")}
        audit.append("site.registered", args.name, "ok", details)
    bound = f", at most {args.patches} examples per update" if args.patches else ""
    print(f"site {args.name!r} registered (key fingerprint {info['fingerprint']}{bound})")
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


def _pinned_key(given: Path | None, paths: CoordPaths, site: str | None) -> tuple[PublicKey, str]:
    """The key a log is checked against, and where it comes from: never from beside the log.

    An explicit key file (``given``); else a site's key as registered (``--site``); else the public
    half of this coordinator's own signing key in ``--dir``.
    """
    from common import keys
    from common.registry import site_public_keys

    if given is not None:
        return keys.load_public_key(given), f"given: {given}"
    if site is not None:
        registered = site_public_keys(paths)
        if site not in registered:
            raise ValueError(f"--site {site!r} is not registered (known: {sorted(registered)})")
        return registered[site], f"registered for site {site!r}"
    own = keys.load_private_key(paths.key).public_key()
    return own, "this coordinator's signing key"


def _audit_verify(args: argparse.Namespace) -> int:
    from common.audit_verify import format_verify_report, parse_head, verify_log

    paths = CoordPaths(args.dir).require()
    expect = parse_head(args.expect_head) if args.expect_head else None
    key, source = _pinned_key(args.key, paths, args.site)
    report = verify_log(args.log, key, expect_head=expect)
    print(f"{format_verify_report(report, key)} ({source})")
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _cross_check(args: argparse.Namespace) -> int:
    from common.audit_verify import cross_check, format_cross_check

    paths = CoordPaths(args.dir).require()
    server_key, _ = _pinned_key(args.server_key, paths, None)
    site_key, _ = _pinned_key(args.site_key, paths, args.site)
    report = cross_check(args.server_log, server_key, args.site_log, site_key, args.site)
    print(
        format_cross_check(report, [("coordinator", server_key), (f"site {args.site}", site_key)])
    )
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _add_audit(sub: argparse._SubParsersAction) -> None:
    _, keys_from, cross = add_audit_commands(
        sub, _audit_verify, _cross_check, "the coordinator's folder"
    )
    keys_from.add_argument("--site", default=None, help="a site's log: its registered key")
    cross.add_argument("server_log", type=Path, help="the coordinator's audit log")
    cross.add_argument("site_log", type=Path, help="the site's audit log")
    cross.add_argument("--site", required=True, help="the site's registered name")
    cross.add_argument("--server-key", type=Path, default=None, help="default: this coordinator's")
    cross.add_argument(
        "--site-key", type=Path, default=None, help="default: the key registered for --site"
    )


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
    p.add_argument(
        "--patches",
        type=int,
        default=None,
        help="patches the site declared (idc-client check prints it): the most examples "
        "its updates may claim (default: the run's max-examples-per-site)",
    )
    p = add_command(sub, "remove-site", _remove_site, "remove a hospital")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--name", required=True)
    _add_audit(sub)
    from server import dashboard, runner

    runner.add_parsers(sub)
    dashboard.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-server``."""
    args = build_parser().parse_args(argv)
    return dispatch(args, "idc-server")


if __name__ == "__main__":
    sys.exit(main())
