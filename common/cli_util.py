"""Small pieces shared by the three command-line tools: logging, parser top, cache folder."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


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
            "--cache-dir",
            type=Path,
            default=None,
            help="decoded-patch cache (default $IDC_CACHE_DIR or ~/.cache/idc-fl)",
        )
    return parser, parser.add_subparsers(dest="command", required=True)


def dispatch(args: argparse.Namespace, prog: str, errors: tuple[type[Exception], ...]) -> int:
    """Run the chosen subcommand; an expected error is one line on stderr and exit code 2."""
    setup_logging(args.verbose)
    absolute_paths(args)
    if getattr(args, "cache_dir", "unset") is None:
        args.cache_dir = default_cache_dir()
    try:
        return int(args.func(args))
    except errors as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Make every path argument absolute, here at the edge.

    Paths travel to processes with other working directories (the ServerApp runs in the
    SuperLink's folder, ClientApps in the SuperNode's), where a relative path means
    something else or nothing.
    """
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, value.expanduser().absolute())
    return args


def default_cache_dir() -> Path:
    """Where decoded-patch caches live: ``$IDC_CACHE_DIR``, else ``~/.cache/idc-fl``.

    Never next to the data: a data folder may be read-only.
    """
    env = os.environ.get("IDC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "idc-fl"
