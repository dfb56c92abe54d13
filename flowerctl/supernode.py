"""``flower-supernode`` with its fixed idle waits shortened (Flower 1.42.0 only).

Flower 1.42's SuperNode main loop (``flwr.supernode.start_client_internal``) sleeps 3 s
whenever a pull from the SuperLink finds no message, waits for the ClientApp's reply in
0.5 s steps, and pulls a message's objects with a backoff that starts at 1 s and doubles to
10 s (the SuperLink hands out a message before its sender has pushed all of its objects).
None of these has an option. Per round each message waits on them: seconds of a round that
is neither training nor evaluating. This launcher runs Flower's own ``flower-supernode``
entry point unchanged except for those waits: the module's ``time.sleep`` maps 3 s to
:data:`IDLE_PULL_S` and 0.5 s to :data:`REPLY_POLL_S`, and its ``pull_objects`` starts at
:data:`OBJECT_BACKOFF_S`. Nothing else moves: the same flags, TLS, node authentication and
``--isolation process`` (the site's executor still checks every run's app). Its log lines
carry their time and no colour codes: they go to a file (``logs/supernode.log``) that the
site's IT reads, and without times nobody can tell how long a message took to arrive.

A faster idle pull costs CPU and TLS handshakes on the coordinator, through its gateway, for
every site: :data:`IDLE_PULL_S` is chosen by ``benchmarks/fl_round_overhead.py`` (see the
README). The waits are found by their exact source text; :func:`patch` refuses any Flower
but 1.42.0, and ``tests/unit/test_supernode_launcher.py`` fails if Flower's code moved.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from typing import Any

PINNED = "1.42.0"
IDLE_PULL_S = 0.5  # Flower: 3 s between pulls that found no message
REPLY_POLL_S = 0.05  # Flower: 0.5 s between looks for the ClientApp's reply (in-process)
OBJECT_BACKOFF_S = (0.05, 0.5)  # Flower: 1 s doubling to 10 s for an object still in transit
# (waited seconds in Flower's source, the exact text, how many times it must appear)
WAITS = {3: ("time.sleep(3)", 1), 0.5: ("time.sleep(0.5)", 2)}
SHORTER = {3: IDLE_PULL_S, 0.5: REPLY_POLL_S}


class _ShortTime:
    """The ``time`` module as ``start_client_internal`` sees it: only ``sleep`` differs."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(SHORTER.get(seconds, seconds))


def check_source(source: str) -> None:
    """Raise RuntimeError unless the SuperNode loop's ``source`` holds the waits we shorten."""
    for text, count in WAITS.values():
        if source.count(text) != count:
            raise RuntimeError(
                f"flwr.supernode.start_client_internal no longer holds {count} x {text!r}: "
                f"this launcher fits Flower {PINNED} only"
            )
    if "pull_objects(" not in source or "\nimport time\n" not in source:
        raise RuntimeError(f"Flower's SuperNode loop moved: this launcher fits Flower {PINNED}")


def patch() -> None:
    """Shorten the SuperNode loop's waits in this process; refuse another Flower version."""
    from flwr.supercore.version import package_version

    if package_version != PINNED:
        raise RuntimeError(
            f"the SuperNode launcher fits Flower {PINNED}, but Flower {package_version} is "
            "installed: install flwr==1.42.0 (see pyproject.toml)"
        )
    from flwr.supernode import start_client_internal as loop

    check_source(inspect.getsource(loop))
    # The loop's `time` is the time module: a stand-in of another type, so set it by name.
    setattr(loop, "time", _ShortTime())  # noqa: B010
    first, cap = OBJECT_BACKOFF_S
    loop.pull_objects = functools.partial(loop.pull_objects, initial_backoff=first, backoff_cap=cap)


def timed_logs() -> None:
    """Flower's log lines with their time; colour codes only on a terminal.

    Also used by the coordinator's ServerApp process (``serverapp.log``).
    """
    from flwr.common.logger import update_console_handler

    update_console_handler(timestamps=True, colored=sys.stdout.isatty())


def main() -> int:
    """``python -m flowerctl.supernode FLAGS``: exactly ``flower-supernode FLAGS``."""
    try:
        patch()
    except RuntimeError as exc:
        print(f"flower-supernode launcher: error: {exc}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    timed_logs()
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
