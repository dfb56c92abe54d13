"""``KEY=VALUE`` run-config overrides from a command line, checked by :class:`RunConfig`.

``idc-server run --run-config`` and ``idc-sim federated/privacy-sweep --recipe`` read them the
same way.
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


# The training recipe's keys (the rest of a run config is the simulation's own: rounds, epochs,
# learning rate and batch size have their flags, DP and sites come from the command).
RECIPE_KEYS = ("model", "augment", "weight-decay", "lr-schedule", "ema", "dp.augmult")


def parse_recipe(items: list[str]) -> dict[str, Scalar]:
    """``--recipe KEY=VALUE`` items: recipe keys only (:data:`RECIPE_KEYS`), values checked."""
    for item in items:
        key = item.partition("=")[0].strip()
        if "=" in item and key not in RECIPE_KEYS:
            raise ValueError(
                f"--recipe: {key!r} is not a recipe key; recipe keys: {', '.join(RECIPE_KEYS)} "
                "(rounds, epochs, learning rate, batch size and DP have their own flags)"
            )
    try:
        return parse_overrides(items, flag="--recipe")
    except ValueError as exc:
        raise ValueError(
            str(exc) if str(exc).startswith("--recipe") else f"--recipe: {exc}"
        ) from None
