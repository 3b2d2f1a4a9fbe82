"""The sidecar's check of what a worker wrote, on real slot views."""

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm_protocol.layout import LayoutParams, SlotError, slots_view
from sidecar.scheduler import validate_slot

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


@settings(max_examples=400, deadline=None)
@given(
    lengths=st.lists(st.integers(-1, 12), min_size=1, max_size=P.max_texts),
    ids=st.lists(st.integers(-3, P.vocab_size + 3), min_size=1, max_size=P.max_tokens),
    n_tokens_shift=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_whatever_a_worker_writes_a_valid_verdict_means_a_safe_slot(lengths, ids, n_tokens_shift):
    """Plausible counts over arbitrary offsets and ids (random bytes would
    nearly always be BAD_COUNT, and the property would never be checked):
    whenever the sidecar calls a slot valid, every id is in the vocabulary
    and every text is non-empty and within the model's limit; and the
    verdict is NONE exactly when that holds."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    n_tokens = max(1, min(P.max_tokens, offsets[-1] + n_tokens_shift))
    ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]
    buf = mmap.mmap(-1, P.data_bytes)
    sv = slots_view(buf, P)[0, 0]
    sv["tokens"][:n_tokens] = ids
    sv["offsets"][: len(offsets)] = np.asarray(offsets) % (1 << 32)
    code, offs, got = validate_slot(len(lengths), n_tokens, sv["offsets"], sv["tokens"], P)
    safe = (offsets[-1] == n_tokens and all(1 <= n <= P.max_seq_length for n in lengths)
            and all(0 <= i < P.vocab_size for i in ids))
    assert (code == SlotError.NONE) == safe, (code, lengths, n_tokens)
    if code == SlotError.NONE:
        assert got.min() >= 0 and got.max() < P.vocab_size
        assert (np.diff(offs) > 0).all() and (np.diff(offs) <= P.max_seq_length).all()
        assert got.tolist() == ids
