"""Digests of bytes and of named arrays (model weights, updates): what audit and signatures name."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from common.audit_format import canonical_json

_ARRAYS_TAG = b"idc-arrays-v1\n"


def digest_bytes(data: bytes) -> str:
    """Return the SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest_arrays(named_arrays: Mapping[str, np.ndarray]) -> str:
    """Return a SHA-256 hex digest of named numeric arrays (model weights or an update).

    Covers, in the mapping's order, each name, dtype, shape and the values' C-order bytes,
    each length-prefixed so no two different inputs share a byte stream. Byte order is
    normalised to little-endian, so the digest depends only on names, dtypes, shapes and
    values, not on memory layout or the host.

    Raises
    ------
    TypeError
        If a name is not a string or an array is not a numeric ``numpy.ndarray``.
    """
    digest = hashlib.sha256(_ARRAYS_TAG)
    digest.update(len(named_arrays).to_bytes(8, "big"))
    for name, array in named_arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array name {name!r} is not a string")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"array {name!r} is a {type(array).__name__}, not a numpy.ndarray")
        if array.dtype.kind not in "biufc":
            raise TypeError(f"array {name!r} has non-numeric dtype {array.dtype}")
        # asarray, not ascontiguousarray: the latter turns a 0-d array into shape (1,).
        little = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
        header = canonical_json({"name": name, "dtype": little.dtype.str, "shape": little.shape})
        digest.update(len(header).to_bytes(8, "big"))
        digest.update(header)
        digest.update(little.nbytes.to_bytes(8, "big"))
        digest.update(little.data)  # hashlib reads the C-contiguous buffer without a copy
    return digest.hexdigest()


def digest_update(named_arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of model weights independent of the order they travel in (names sorted)."""
    return digest_arrays({k: named_arrays[k] for k in sorted(named_arrays)})
