"""A site's records of the queries it answered, by run: refinements and evaluations.

Read by the site before it answers (:mod:`client.site`) and by ``idc-client status``
(:mod:`client.status`), through the same checks: a record that cannot be read, or whose entry
is not one the record holds, is refused (fail closed: the site answers nothing of that kind
until it is restored).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.fileio import atomic_write, read_json


def read_answered(path: Path, what: str, entry: Callable[[Any], bool]) -> dict[str, Any]:
    """The record at ``path`` (empty when absent); ValueError naming it when it is not one.

    ``what``: the kind of query, for the message; ``entry``: whether a run's value is one
    this record holds.
    """
    answered = read_json(path) if path.exists() else {}
    if not isinstance(answered, dict) or not all(entry(v) for v in answered.values()):
        raise ValueError(f"{path} is not a record of {what}; restore it or remove it")
    return answered


def write_answered(path: Path, answered: dict[str, Any]) -> None:
    """Replace the record at ``path`` atomically, readable by the site's user only."""
    atomic_write(path, json.dumps(answered, indent=1).encode(), mode=0o600)


def is_count(value: Any) -> bool:
    """Whether ``value`` is an evaluation record's entry: a count, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_time(value: Any) -> bool:
    """Whether ``value`` is a refinement record's entry: when the run asked."""
    return isinstance(value, str)


def read_evaluations(path: Path) -> dict[str, Any]:
    """The evaluations answered, by run, in the order each run was first seen."""
    return read_answered(path, "evaluations", is_count)


def read_refinements(path: Path) -> dict[str, Any]:
    """The threshold refinements answered, by run: when each was answered."""
    return read_answered(path, "refinements", is_time)
