"""common.packing: a model as one Array on the wire, and every way a packed model is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from common import protocol
from common.digests import digest_update
from common.model import build_model
from common.packing import PackingError, pack, unpack
from common.site_data import model_arrays

REF = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "steps": np.array(7, np.int64),  # a 0-d int64, like a BatchNorm counter
    "b": np.ones(4, np.float64),
}


def _layout(record: ConfigRecord) -> list:
    return json.loads(str(record[protocol.LAYOUT_KEY]))


def _with_layout(entries: list) -> ConfigRecord:
    return ConfigRecord({protocol.LAYOUT_KEY: json.dumps(entries)})


def test_round_trip_keeps_names_dtypes_shapes_and_values():
    record, layout = pack(REF)
    assert list(record.keys()) == [protocol.PACKED]
    assert record[protocol.PACKED].stype == protocol.RAW_BYTES
    out = unpack(record, layout, REF)
    assert list(out) == list(REF)
    for name, ref in REF.items():
        assert out[name].dtype == ref.dtype and out[name].shape == ref.shape
        assert np.array_equal(out[name], ref)
        assert out[name].flags.writeable  # training writes into what it is given
    assert digest_update(out) == digest_update(REF)  # audit digests mean the same thing


def test_the_paper_model_with_batchnorm_counters_is_one_array_and_round_trips():
    model = build_model("batch", seed=0)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert any(v.dtype == np.int64 for v in state.values())
    record, layout = pack(state)
    assert len(record) == 1 and len(_layout(layout)) == len(state) > 60
    out = unpack(record, layout, state)
    assert all(np.array_equal(out[k], v) for k, v in state.items())


def test_a_layout_in_another_order_still_unpacks_by_name():
    record, _ = pack(REF)
    reordered = {k: REF[k] for k in reversed(REF)}
    packed_again, layout = pack(reordered)
    assert np.array_equal(unpack(packed_again, layout, REF)["w"], REF["w"])
    assert record[protocol.PACKED].data != packed_again[protocol.PACKED].data


def _refused(record: ArrayRecord, layout: ConfigRecord, *words: str) -> None:
    with pytest.raises(PackingError) as info:
        unpack(record, layout, REF)
    for word in words:
        assert word in str(info.value)


def test_a_missing_array_is_refused():
    record, layout = pack({k: v for k, v in REF.items() if k != "b"})
    _refused(record, layout, "missing ['b']")


def test_an_unknown_array_is_refused():
    record, layout = pack({**REF, "extra": np.zeros(2, np.float32)})
    _refused(record, layout, "unexpected ['extra']")


def test_an_array_named_twice_is_refused():
    record, layout = pack(REF)
    entries = _layout(layout)
    _refused(record, _with_layout([*entries, entries[0]]), "'w'", "twice")


def test_another_dtype_is_refused():
    record, layout = pack({**REF, "w": REF["w"].astype(np.float64)})
    _refused(record, layout, "'w'", "float64", "expected float32")


def test_a_string_dtype_is_refused_and_never_decoded():
    record, layout = pack(REF)
    entries = _layout(layout)
    entries[0][1] = "<U1"
    _refused(record, _with_layout(entries), "'w'", "<U1")


def test_another_shape_is_refused():
    record, layout = pack({**REF, "w": REF["w"].reshape(3, 2)})
    _refused(record, layout, "'w'", "[3, 2]", "(2, 3)")


def test_a_huge_declared_shape_is_refused_before_anything_is_allocated():
    record, layout = pack(REF)
    entries = _layout(layout)
    entries[0][2] = [10**6, 10**6]
    _refused(record, _with_layout(entries), "'w'", "declares")


def test_an_offset_that_overlaps_is_refused():
    record, layout = pack(REF)
    entries = _layout(layout)
    entries[1][3] = 0  # read the counter out of w's bytes
    _refused(record, _with_layout(entries), "'steps'", "starts at byte 0")


@pytest.mark.parametrize("cut", [-1, 1])
def test_a_byte_length_mismatch_is_refused(cut):
    record, layout = pack(REF)
    data = record[protocol.PACKED].data
    data = data[:cut] if cut < 0 else data + b"\0" * cut
    odd = ArrayRecord({protocol.PACKED: Array("uint8", (len(data),), protocol.RAW_BYTES, data)})
    _refused(odd, layout, "does not decode", str(len(data)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused(value):
    bad = REF["b"].copy()
    bad[2] = value
    record, layout = pack({**REF, "b": bad})
    _refused(record, layout, "'b'", "NaN or infinity")


def test_garbage_layout_is_refused():
    record, _ = pack(REF)
    _refused(record, ConfigRecord({protocol.LAYOUT_KEY: "{not json"}), "not JSON")
    _refused(record, ConfigRecord({protocol.LAYOUT_KEY: 3}), protocol.LAYOUT_KEY)
    _refused(record, _with_layout([["w", "float32"]]), "[name, dtype, shape, offset]")
    _refused(record, _with_layout({"w": 1}), "JSON list")


def test_named_arrays_instead_of_one_packed_array_are_refused():
    _, layout = pack(REF)
    named = ArrayRecord({k: Array(v) for k, v in REF.items()})
    _refused(named, layout, "expected one packed array")


def test_a_packed_array_of_another_serialisation_is_refused():
    _, layout = pack(REF)
    npy = ArrayRecord({protocol.PACKED: Array(np.zeros(8, np.uint8))})  # numpy.ndarray stype
    _refused(npy, layout, "raw bytes")


def test_the_paper_model_as_a_site_builds_it_is_the_reference_for_the_global_one():
    """What the coordinator sends (the seeded initial model) unpacks against a site's own."""
    sent = model_arrays(build_model("group", seed=1))
    record, layout = pack(sent)
    own = model_arrays(build_model("group", seed=2))
    out = unpack(record, layout, own)
    assert digest_update(out) == digest_update(sent)
