"""The sidecar's check of what a worker wrote, on real slot views."""

import mmap

import numpy as np
import pytest

from shm_protocol.layout import LayoutParams, SlotError, slots_view
from sidecar.server import validate_slot

P = LayoutParams(n_rings=1, slots_per_ring=1, max_texts=4, max_tokens=64, dim=3, max_seq_length=10, vocab_size=100)


def slot(ids, offsets, n_texts=None, n_tokens=None):
    buf = mmap.mmap(-1, P.data_bytes)
    s = slots_view(buf, P)[0, 0]
    s["tokens"][: len(ids)] = ids
    s["offsets"][: len(offsets)] = offsets
    n_texts = len(offsets) - 1 if n_texts is None else n_texts
    n_tokens = len(ids) if n_tokens is None else n_tokens
    return validate_slot(n_texts, n_tokens, s["offsets"], s["tokens"], P)


def test_valid_slot_returns_private_copies():
    code, offs, ids = slot([1, 2, 3, 4, 5], [0, 2, 5])
    assert code == SlotError.NONE
    assert offs.tolist() == [0, 2, 5]
    assert ids.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("ids,offsets,kw,code", [
    ([1], [0, 1], {"n_texts": 0}, SlotError.BAD_COUNT),
    ([1], [0, 1], {"n_texts": 5}, SlotError.BAD_COUNT),
    ([1], [0, 1], {"n_tokens": 65}, SlotError.BAD_COUNT),
    ([1, 2], [1, 2], {}, SlotError.BAD_OFFSETS),
    ([1, 2, 3], [0, 2, 1, 3], {}, SlotError.BAD_OFFSETS),
    ([1, 2], [0, 0, 2], {}, SlotError.BAD_OFFSETS),
    ([1, 2], [0, 1], {"n_tokens": 2}, SlotError.BAD_OFFSETS),
    ([1] * 11, [0, 11], {}, SlotError.TOO_LONG),
    ([1, 100], [0, 2], {}, SlotError.BAD_TOKEN),
    ([1, -5], [0, 2], {}, SlotError.BAD_TOKEN),
])
def test_bad_slots_get_their_error_code(ids, offsets, kw, code):
    assert slot(ids, offsets, **kw)[0] == code


def test_random_bytes_never_pass_as_valid_with_out_of_range_ids():
    rng = np.random.default_rng(0)
    for _ in range(300):
        buf = mmap.mmap(-1, P.data_bytes)
        buf[:] = rng.integers(0, 256, P.data_bytes, dtype=np.uint8).tobytes()
        s = slots_view(buf, P)[0, 0]
        code, offs, ids = validate_slot(int(s["n_texts"]), int(s["n_tokens"]), s["offsets"], s["tokens"], P)
        if code == SlotError.NONE:
            assert ids.min() >= 0 and ids.max() < P.vocab_size
            assert (np.diff(offs) > 0).all() and (np.diff(offs) <= P.max_seq_length).all()
