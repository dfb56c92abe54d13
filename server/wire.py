"""The coordinator's messages as they travel: models packed once, held models named, metrics read.

Flower's strategies build the messages; these helpers give them the wire form of
:mod:`common.packing` (one packed Array per model) and, for a site that said it holds the
round's model (:mod:`client.held`), the digest in its place.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import protocol
from common.packing import pack


def floats(record: MetricRecord | None) -> dict[str, float]:
    """Scalar metrics as plain floats (lists, which we never send, are dropped)."""
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def packed(messages: Iterable[Message]) -> list[Message]:
    """The messages with their model packed for the wire (:mod:`common.packing`).

    Flower's strategies give every message of a round the same RecordDict; each distinct
    model is packed once.
    """
    out = list(messages)
    done: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}
    for msg in out:
        content = msg.content
        record = content.array_records.get(protocol.ARRAYS)
        if record is None or protocol.LAYOUT in content:
            continue
        if id(record) not in done:
            done[id(record)] = pack(to_numpy(record))
        content[protocol.ARRAYS], content[protocol.LAYOUT] = done[id(record)]
    return out


def naming_held(msg: Message, digest: str) -> Message:
    """``msg`` naming the model ``digest`` that its site holds, in place of the packed model.

    The message gets its own RecordDict: the others of the round share theirs and still carry
    the model.
    """
    content = {k: v for k, v in msg.content.items() if k not in (protocol.ARRAYS, protocol.LAYOUT)}
    content[protocol.ARRAYS] = ArrayRecord()
    content[protocol.LAYOUT] = ConfigRecord({protocol.HELD: digest})
    msg.content = RecordDict(content)
    return msg
