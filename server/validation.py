"""Checks on a site's reply before it may enter the aggregate."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def validate_update(
    reference: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
) -> str | None:
    """Return why ``update`` cannot be averaged into ``reference``, or None when it can.

    The update must carry exactly the reference's array names, each with the same shape and
    dtype, and only finite values.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"array names differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            return f"array {name!r} has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"array {name!r} has dtype {arr.dtype}, expected {ref.dtype}"
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            return f"array {name!r} holds NaN or infinity"
    return None
