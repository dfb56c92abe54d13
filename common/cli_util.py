"""The three command-line tools' shared edge: parser top, subcommand registration, dispatch.

:func:`dispatch` is the one place where an exception becomes one line on stderr and an exit
code from the table in :mod:`common.errors`; no traceback reaches a user (``-v`` shows one
for an internal error).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    IdcError,
)

Command = Callable[[argparse.Namespace], int]


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr at INFO (DEBUG with ``verbose``)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # importing Flower or Ray installs a root handler at WARNING first
    )
    if not verbose:  # one line per HTTP poll of the SuperLink drowns the progress lines,
        # and Flower's database migrations announce each alembic plugin they load
        for noisy in ("httpx", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


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


def add_command(
    sub: argparse._SubParsersAction, name: str, func: Command, help: str
) -> argparse.ArgumentParser:
    """Register subcommand ``name`` run by ``func``; every subcommand of every tool comes here."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(func=func)
    return parser


def dispatch(
    args: argparse.Namespace, prog: str, prepare: Callable[[argparse.Namespace], None] | None = None
) -> int:
    """Run the chosen subcommand; every failure is one line on stderr and its exit code.

    The project's named errors carry their code (:class:`common.errors.IdcError`); the
    standard library's errors about values and files are bad input (2); anything else is a
    bug (70), whose traceback ``-v`` shows.
    """
    setup_logging(args.verbose)
    absolute_paths(args)
    if getattr(args, "cache_dir", "unset") is None:
        args.cache_dir = default_cache_dir()
    where = " ".join(
        str(v) for v in (prog, args.command, getattr(args, "audit_command", None)) if v
    )
    with terminate_as_interrupt():
        return _run(args, where, prepare)


def run_script(main: Callable[[], int | None], where: str) -> int:
    """A script's ``main`` (a benchmark) under :func:`terminate_as_interrupt`.

    Ctrl-C or ``kill PID`` unwinds it like :func:`dispatch` does a command, so the SuperLink,
    Ray and Flower processes it started are stopped on the way out; one line says so and the
    exit status is :data:`EXIT_INTERRUPTED`.
    """
    try:
        with terminate_as_interrupt():
            return int(main() or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, systemd, a CI timeout) unwinds like Ctrl-C while a command runs.

    Python's default for SIGTERM ends the process at once, skipping every ``finally`` and
    ``with`` exit: the SuperLink, Ray and Flower processes a command started would be left
    running. As an interrupt they are stopped on the way out, as after Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(
    args: argparse.Namespace, where: str, prepare: Callable[[argparse.Namespace], None] | None
) -> int:
    try:
        if prepare is not None:
            prepare(args)
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except IdcError as exc:
        kind = "refused" if exc.exit_code == EXIT_REFUSED else "error"
        print(f"{where}: {kind}: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:
        print(f"{where}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug: still one line, and the way to see more
        if args.verbose:
            traceback.print_exc()
        print(
            f"{where}: internal error: {type(exc).__name__}: {one_line(exc)} "
            "(rerun with -v for the traceback, and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; a file error names its file."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


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


def add_audit_commands(
    sub: argparse._SubParsersAction,
    verify: Callable[[argparse.Namespace], int],
    cross_check: Callable[[argparse.Namespace], int],
    folder_help: str,
) -> tuple[argparse.ArgumentParser, argparse._MutuallyExclusiveGroup, argparse.ArgumentParser]:
    """``audit verify`` and ``audit cross-check``, the same on both parties' tools.

    Returns the verify parser, its group of mutually exclusive key sources (``--key`` is
    already in it; each tool adds its pinned source) and the cross-check parser, both with
    ``--dir`` (the folder that pins the keys) already added.
    """
    audit = sub.add_parser("audit", help="check audit logs with pinned keys")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    p = add_command(asub, "verify", verify, "check the hash chain and every signature")
    p.add_argument("log", type=Path, help="the audit log to check")
    p.add_argument("--dir", type=Path, required=True, help=folder_help)
    keys_from = p.add_mutually_exclusive_group()
    keys_from.add_argument("--key", type=Path, default=None, help="check with this public key")
    p.add_argument(
        "--expect-head",
        default=None,
        metavar="SEQ:HASH",
        help="a head recorded earlier (printed by verify): detects truncation and rewrites",
    )
    c = add_command(asub, "cross-check", cross_check, "match the updates sent with those received")
    c.add_argument("--dir", type=Path, required=True, help=folder_help)
    return p, keys_from, c
