"""``KEY=VALUE`` run-config overrides from a command line, checked by :class:`RunConfig`.

``idc-server run --run-config`` and ``idc-sim federated/privacy-sweep --recipe``
(:func:`simulation.recipe.parse_recipe`) read them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.config import RunConfig, Scalar


def parse_overrides(
    items: list[str], base: Mapping[str, Scalar] | None = None, flag: str = "--run-config"
) -> dict[str, Scalar]:
    """``key=value`` pairs over ``base``, checked by :class:`RunConfig` (bad keys and values named).

    Values parse as TOML scalars (numbers, booleans, quoted strings); anything else is a string.
    """
    import tomli

    out: dict[str, Scalar] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{flag} entries must be key=value, got {item!r}")
        try:
            out[key.strip()] = tomli.loads(f"v = {value.strip()}")["v"]
        except tomli.TOMLDecodeError:
            out[key.strip()] = value.strip()
    RunConfig.from_run_config({**(base or {}), **out})
    return out
