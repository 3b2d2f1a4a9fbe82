import mmap

import numpy as np
import pytest

from shm_protocol.errors import LayoutMismatch
from shm_protocol.layout import (
    HEADER_DTYPE,
    LATENCY_BUCKETS_S,
    LAYOUT_HASH,
    MAGIC,
    PROTOCOL_VERSION,
    SLOT_ALIGN,
    SLOT_READY,
    LayoutParams,
    SlotState,
    bucket_index,
    check_prefix,
    header_view,
    hist_quantile,
    slots_view,
)

PARAMS = LayoutParams(n_rings=3, slots_per_ring=2, max_texts=5, max_tokens=300, dim=7,
                      max_seq_length=256, vocab_size=1000)


def test_slot_is_cache_line_aligned_and_fields_do_not_overlap():
    dt = PARAMS.slot_dtype
    assert dt.itemsize % SLOT_ALIGN == 0
    spans = sorted((off, off + sub.itemsize) for sub, off in (dt.fields[n][:2] for n in dt.names))
    for (_a0, a1), (b0, _b1) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert dt["tokens"].shape == (300,)
    assert dt["out"].shape == (5, 7)
    assert dt["offsets"].shape == (6,)


def test_header_round_trip_and_sizes():
    buf = bytearray(PARAMS.ctl_bytes)
    header = header_view(buf)
    header["magic"] = MAGIC
    header["version"] = PROTOCOL_VERSION
    header["layout_hash"] = LAYOUT_HASH
    PARAMS.write_header(header)
    check_prefix(buf, "t")
    assert LayoutParams.from_header(header_view(buf)) == PARAMS
    assert int(header["slot_bytes"]) == PARAMS.slot_dtype.itemsize
    assert PARAMS.ctl_bytes > HEADER_DTYPE.itemsize
    assert PARAMS.data_bytes == PARAMS.slot_dtype.itemsize * 6


def test_slots_view_writes_land_in_the_buffer():
    buf = mmap.mmap(-1, PARAMS.data_bytes)
    slots = slots_view(buf, PARAMS)
    slots["state"][2, 1] = SLOT_READY
    slots["tokens"][2, 1, :3] = [5, 6, 7]
    off = (2 * 2 + 1) * PARAMS.slot_dtype.itemsize
    assert int.from_bytes(buf[off: off + 4], "little") == SlotState.READY
    tok_off = off + PARAMS.slot_dtype.fields["tokens"][1]
    assert np.frombuffer(buf, "<i4", 3, tok_off).tolist() == [5, 6, 7]


@pytest.mark.parametrize("magic,version,match", [(b"NOTOURS!", PROTOCOL_VERSION, "magic"), (MAGIC, 99, "version 99")])
def test_mismatched_prefix_raises_typed_error(magic, version, match):
    buf = bytearray(PARAMS.ctl_bytes)
    h = header_view(buf)
    h["magic"] = magic
    h["version"] = version
    with pytest.raises(LayoutMismatch, match=match):
        check_prefix(buf, "t")


def test_short_segment_is_a_mismatch():
    with pytest.raises(LayoutMismatch):
        check_prefix(bytearray(10), "t")


def test_histogram_helpers():
    assert bucket_index(0.00005, LATENCY_BUCKETS_S) == 0
    assert bucket_index(0.003, LATENCY_BUCKETS_S) == LATENCY_BUCKETS_S.index(0.005)
    assert bucket_index(1e9, LATENCY_BUCKETS_S) == len(LATENCY_BUCKETS_S)
    counts = np.zeros(len(LATENCY_BUCKETS_S) + 1)
    assert hist_quantile(counts, LATENCY_BUCKETS_S, 0.5) is None
    counts[2] = 90
    counts[8] = 10
    assert hist_quantile(counts, LATENCY_BUCKETS_S, 0.5) == LATENCY_BUCKETS_S[2]
    assert hist_quantile(counts, LATENCY_BUCKETS_S, 0.99) == LATENCY_BUCKETS_S[8]


def test_a_header_of_another_field_layout_is_a_mismatch_even_with_the_same_version():
    buf = bytearray(PARAMS.ctl_bytes)
    h = header_view(buf)
    h["magic"] = MAGIC
    h["version"] = PROTOCOL_VERSION
    h["layout_hash"] = LAYOUT_HASH ^ 1  # a build whose fields differ, sizes alike
    with pytest.raises(LayoutMismatch, match="field layout"):
        check_prefix(buf, "t")
