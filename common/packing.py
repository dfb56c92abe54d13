"""A model's named arrays as ONE Array on the wire, and back, checked against a reference.

Why: Flower sends every Array of an ArrayRecord (and every 5 MB chunk of it) as its own
object, one HTTPS request each through the coordinator's gateway, the SuperLink and the
SuperNode. The paper's model is 70 arrays, so a model message was ~150 requests; packed it
is one Array of ~10 MB (three chunks) plus its record.

Wire form (:mod:`common.protocol` names the keys):

- the ArrayRecord holds exactly one Array, ``PACKED``: dtype ``uint8``, shape ``(n,)``,
  stype ``RAW_BYTES``, data the arrays' C-order little-endian bytes, one after another in
  the layout's order, with no gaps;
- the ConfigRecord ``LAYOUT`` holds ``LAYOUT_KEY``: a JSON list of
  ``[name, dtype, shape, offset]``, one entry per array (dtype as numpy names it, e.g.
  ``"float32"``, ``"int64"``).

:func:`unpack` trusts nothing it reads: the names must be exactly the reference's, each
dtype and shape equal to the reference's (compared as text before anything is allocated;
the dtype used to decode is the reference's, never the sender's), each offset where the
previous array ended, the byte count exact, and floats finite. Any difference raises
:class:`PackingError` naming the array and what differs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.protocol import LAYOUT_KEY, PACKED, RAW_BYTES

_MAX_LAYOUT_CHARS = 1 << 20  # a real layout is a few kB; refuse to parse megabytes of JSON


class PackingError(ValueError):
    """A packed model that does not fit the reference; ``str()`` is the one-line reason."""


def _little(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[ArrayRecord, ConfigRecord]:
    """Named numeric arrays as one raw-bytes Array and the layout that names its parts."""
    layout: list[list[Any]] = []
    parts: list[bytes | memoryview] = []
    offset = 0
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise PackingError(f"array {name!r} has non-numeric dtype {array.dtype}")
        little = _little(array)
        layout.append([name, str(array.dtype), list(array.shape), offset])
        parts.append(little.data.cast("B") if little.nbytes else b"")
        offset += little.nbytes
    data = b"".join(parts)
    record = ArrayRecord({PACKED: Array("uint8", (len(data),), RAW_BYTES, data)})
    return record, ConfigRecord({LAYOUT_KEY: json.dumps(layout, separators=(",", ":"))})


def _entries(layout: ConfigRecord) -> list[Any]:
    text = layout.get(LAYOUT_KEY) if isinstance(layout, ConfigRecord) else None
    if not isinstance(text, str):
        raise PackingError(f"the layout must be a ConfigRecord with text {LAYOUT_KEY!r}")
    if len(text) > _MAX_LAYOUT_CHARS:
        raise PackingError(f"the layout is {len(text)} characters, at most {_MAX_LAYOUT_CHARS}")
    try:
        entries = json.loads(text)
    except ValueError:
        raise PackingError("the layout does not decode: not JSON") from None
    if not isinstance(entries, list):
        raise PackingError("the layout must be a JSON list of [name, dtype, shape, offset]")
    return entries


def _data(record: ArrayRecord) -> bytes:
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [PACKED]:
        names = list(record.keys())[:3] if isinstance(record, ArrayRecord) else []
        raise PackingError(f"expected one packed array {PACKED!r}, got arrays {names}")
    array = record[PACKED]
    if array.stype != RAW_BYTES or array.dtype != "uint8" or not isinstance(array.data, bytes):
        raise PackingError(
            f"array {PACKED!r} must be uint8 raw bytes ({RAW_BYTES!r}), got {array.stype!r}"
        )
    return array.data


def _check_entry(entry: Any, ref: Mapping[str, np.ndarray], seen: set[str], offset: int) -> str:
    """The entry's name once it matches the reference at ``offset``; PackingError if not."""
    if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
        raise PackingError("each layout entry must be [name, dtype, shape, offset]")
    name, dtype, shape, at = entry
    if name not in ref:
        raise PackingError(f"array names differ: unexpected [{name!r}]")
    if name in seen:
        raise PackingError(f"array {name!r} appears twice in the layout")
    expected = ref[name]
    same_shape = isinstance(shape, list) and tuple(shape) == expected.shape
    if dtype != str(expected.dtype) or not same_shape:
        raise PackingError(
            f"array {name!r} declares {dtype}{shape}, expected {expected.dtype}{expected.shape}"
        )
    if isinstance(at, bool) or at != offset:
        raise PackingError(f"array {name!r} starts at byte {at!r}, expected {offset}")
    return name


def unpack(
    record: ArrayRecord, layout: ConfigRecord, reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The named arrays of a packed model, each equal in name, dtype and shape to ``reference``.

    Raises
    ------
    PackingError
        Naming the first array (or the part of the wire form) that does not fit.
    """
    data, entries = _data(record), _entries(layout)
    seen: set[str] = set()
    spans: list[tuple[str, int]] = []
    offset = 0
    for entry in entries:
        name = _check_entry(entry, reference, seen, offset)
        seen.add(name)
        spans.append((name, offset))
        offset += reference[name].nbytes
    missing = [k for k in reference if k not in seen]
    if missing:
        raise PackingError(f"array names differ: missing {missing[:3]}")
    if offset != len(data):
        raise PackingError(
            f"packed data does not decode: {len(data)} bytes, the layout needs {offset}"
        )
    out: dict[str, np.ndarray] = {}
    for name, start in spans:
        ref = reference[name]
        wire = (
            np.frombuffer(data, ref.dtype.newbyteorder("<"), ref.size, start) if ref.size else ref
        )
        array = wire.astype(ref.dtype).reshape(ref.shape)  # astype copies: owned, writable
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise PackingError(f"array {name!r} holds NaN or infinity")
        out[name] = array
    return out
