"""The errors of Flower process control; callers branch on these."""

from __future__ import annotations

from common.errors import FederationError


class FlowerProcError(FederationError, RuntimeError):
    """A Flower process or CLI call failed; the message says which and why."""


class FlowerTimeout(FlowerProcError, TimeoutError):
    """A wait ran past its deadline; the message names what it waited for."""


class SuperLinkUnreachable(FlowerProcError, ConnectionError):
    """No connection to the SuperLink's Control API (not started, gone, or TLS refused)."""
