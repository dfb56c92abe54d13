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


PACKAGE = "idc-fl"


def package_version() -> str:
    """The installed idc-fl version, from the package metadata (one source: pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it has none or its help already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.default is None
            or action.default is False  # a flag: its absence needs no "(default: False)"
            or action.default is argparse.SUPPRESS
            or action.default in ([], ())  # a repeatable option given no times
            or action.required
            or "default" in text
            or f"({action.default})" in text  # the help already names it
        ):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser showing defaults; subparsers are made of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def new_parser(prog: str, doc: str | None, cache: bool = True) -> tuple[Any, Any]:
    """The three tools' common top: --version, -v, optionally --cache-dir, subcommands."""
    parser = Parser(prog=prog, description=doc)
    parser.add_argument("--version", action="version", version=f"{prog} {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
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
