"""idc-client start: preflight the data, then run this hospital's SuperNode until stopped."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from common.data import LoadOptions, load_patches


def node_config(args: argparse.Namespace, name: str, cache_dir: Path) -> dict[str, str | float]:
    """Site-local facts for the ClientApp (``context.node_config``); never from the server."""
    cfg: dict[str, str | float] = {
        "site-name": name,
        "data-dir": str(args.data.resolve()),
        "state-dir": str(args.dir.resolve()),
        "cache-dir": str(cache_dir.resolve()),
        "small-policy": args.small,
    }
    if args.max_epsilon is not None:
        cfg["max-epsilon"] = float(args.max_epsilon)
    if args.delta is not None:
        cfg["delta"] = float(args.delta)
    return cfg


def check_privacy_flags(args: argparse.Namespace, n_patches: int) -> None:
    """The site's cap: a positive epsilon, and delta below 1/number of patches."""
    if args.max_epsilon is not None and not (
        args.max_epsilon > 0 and math.isfinite(args.max_epsilon)
    ):
        raise ValueError(f"--max-epsilon must be a positive number, got {args.max_epsilon}")
    if args.delta is not None and not 0 < args.delta < 1 / n_patches:
        raise ValueError(
            f"--delta {args.delta} must be in (0, 1/number of patches) = "
            f"(0, {1 / n_patches:.3g}) for {n_patches} patches"
        )


def _start(args: argparse.Namespace) -> int:
    import flowerctl
    from client.site import SITE_KEY

    if args.insecure:
        print(
            "WARNING: --insecure: plain HTTP and no site key: anyone on the path reads this "
            "site's updates or poses as the coordinator; never use this with patient data",
            file=sys.stderr,
            flush=True,
        )
    site_file = args.dir / "site.json"
    if not site_file.is_file():
        raise FileNotFoundError(f"{args.dir} is not a site folder (run `idc-client init` first)")
    name = json.loads(site_file.read_text())["site-name"]
    if not args.insecure and (args.ca is None or not args.ca.is_file()):
        raise FileNotFoundError(f"--ca {args.ca}: the coordinator's CA certificate is needed")
    patches = load_patches(
        args.data, cache_dir=args.cache_dir, options=LoadOptions(small=args.small), workers=2
    )
    print(patches.report.summary(), flush=True)
    check_privacy_flags(args, len(patches))
    flwr_home = args.dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    key = None
    if not args.insecure:
        key = flowerctl.to_openssh_private_key(args.dir / SITE_KEY, flwr_home / "supernode.key")
    port = args.port or flowerctl.free_port()
    log_path = args.dir / "logs" / "supernode.log"
    proc = flowerctl.start_supernode(
        args.server,
        None if args.insecure else args.ca,
        key,
        node_config(args, name, args.cache_dir),
        port,
        log_path,
        home=flwr_home,
    )
    print(
        f"site {name!r}: SuperNode started for {args.server} (pid {proc.pid}, log {log_path})",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        flowerctl.stop_process(proc)
    if code:
        tail = log_path.read_text(errors="replace")[-2000:]
        print(f"SuperNode exited with {code}; end of its log:\n{tail}", file=sys.stderr)
    return code


def add_start_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-client start``."""
    p = sub.add_parser("start", help="join the federation: run this site's SuperNode")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--ca", type=Path, help="the coordinator's CA certificate (ca.pem)")
    p.add_argument("--data", type=Path, required=True, help="this site's patches (Kaggle layout)")
    p.add_argument("--port", type=int, default=None, help="local port of the SuperNode's API")
    p.add_argument(
        "--max-epsilon", type=float, default=None, help="lifetime privacy cap of this data set"
    )
    p.add_argument("--delta", type=float, default=None, help="the site's DP delta (< 1/patches)")
    p.add_argument("--small", choices=("pad", "skip"), default="pad")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no key (testing only)")
    p.set_defaults(func=_start)
