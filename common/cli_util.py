"""Small pieces shared by the three command-line tools: logging, cache folder, env for Flower."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Every process our commands start gets these, so Flower never phones home, never checks for
# updates, and never installs an app's dependencies at run time (it would pull a CUDA torch).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return a copy of this process's environment with Flower's switches set."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env.update(extra or {})
    return env


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG with ``verbose``)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # importing Flower or Ray installs a root handler at WARNING first
    )
    if not verbose:  # one line per HTTP poll of the SuperLink drowns the progress lines
        logging.getLogger("httpx").setLevel(logging.WARNING)


def new_parser(prog: str, doc: str | None, cache: bool = True) -> tuple[Any, Any]:
    """The three tools' common top: -v, optionally --cache-dir, and required subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("-v", "--verbose", action="store_true")
    if cache:
        parser.add_argument(
            "--cache-dir", type=Path, default=None,
            help="decoded-patch cache (default $IDC_CACHE_DIR or ~/.cache/idc-fl)",
        )  # fmt: skip
    return parser, parser.add_subparsers(dest="command", required=True)


def dispatch(args: argparse.Namespace, prog: str, errors: tuple[type[Exception], ...]) -> int:
    """Run the chosen subcommand; an expected error is one line on stderr and exit code 2."""
    setup_logging(args.verbose)
    if getattr(args, "cache_dir", "unset") is None:
        args.cache_dir = default_cache_dir()
    try:
        return int(args.func(args))
    except errors as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def default_cache_dir() -> Path:
    """Where decoded-patch caches live: ``$IDC_CACHE_DIR``, else ``~/.cache/idc-fl``.

    Never next to the data: a data folder may be read-only.
    """
    env = os.environ.get("IDC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "idc-fl"
