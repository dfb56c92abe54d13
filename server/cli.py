"""idc-server: what the coordinator runs."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-server`` (its subcommands arrive with federated training)."""
    print("idc-server: no subcommands yet", file=sys.stderr)
    return 2
