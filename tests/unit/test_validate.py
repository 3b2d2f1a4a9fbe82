"""The sidecar's check of what a worker wrote (the compiled take), on real slot memory."""

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm_protocol import hotpath
from shm_protocol.layout import SLOT_BUSY, LayoutParams, SlotError, slots_view

P = LayoutParams(n_rings=1, slots_per_ring=1, max_texts=4, max_tokens=64, dim=3, max_seq_length=10, vocab_size=100)


def take(slots, n_texts, n_tokens, *, model=0, pairs=False):
    """The sidecar's take of slot 0 (generation 1, for model ``model``):
    (code, offsets, ids), the arrays as the scheduler builds them."""
    record = slots[0]
    record["n_texts"], record["n_tokens"], record["seq"], record["model"] = n_texts, n_tokens, 1, 0
    code, seq, _, ids, offs, splits = hotpath.ring(slots).take(0, model, P.max_seq_length, P.vocab_size, pairs)
    assert seq == 1 and int(record["state"]) == SLOT_BUSY
    if code != SlotError.NONE:
        assert ids is None and offs is None
        return SlotError(code), None, None
    return SlotError(code), np.frombuffer(offs, np.int64), np.frombuffer(ids, np.int32)


def new_slots():
    return slots_view(mmap.mmap(-1, P.data_bytes), P).reshape(-1)


def slot(ids, offsets, n_texts=None, n_tokens=None):
    slots = new_slots()
    record = slots[0]
    record["tokens"][: len(ids)] = ids
    record["offsets"][: len(offsets)] = offsets
    n_texts = len(offsets) - 1 if n_texts is None else n_texts
    n_tokens = len(ids) if n_tokens is None else n_tokens
    return take(slots, n_texts, n_tokens)


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
    slots = new_slots()
    sv = slots[0]
    sv["tokens"][:n_tokens] = ids
    sv["offsets"][: len(offsets)] = np.asarray(offsets) % (1 << 32)
    code, offs, got = take(slots, len(lengths), n_tokens)
    safe = (offsets[-1] == n_tokens and all(1 <= n <= P.max_seq_length for n in lengths)
            and all(0 <= i < P.vocab_size for i in ids))
    assert (code == SlotError.NONE) == safe, (code, lengths, n_tokens)
    if code == SlotError.NONE:
        assert got.min() >= 0 and got.max() < P.vocab_size
        assert (np.diff(offs) > 0).all() and (np.diff(offs) <= P.max_seq_length).all()
        assert got.tolist() == ids


@pytest.mark.parametrize("segments,pairs,code", [
    ([0, 0], False, SlotError.NONE),
    ([1, 0], True, SlotError.NONE),
    ([1, 0], False, SlotError.BAD_SEGMENTS),  # pairs for a model that takes none
    ([2, 0], True, SlotError.BAD_SEGMENTS),  # a split at the end of its text
    ([0, 2 ** 32 - 1], True, SlotError.BAD_SEGMENTS),  # "negative"
])
def test_segment_splits_lie_inside_their_text_and_only_for_pairs(segments, pairs, code):
    slots = new_slots()
    record = slots[0]
    record["tokens"][:5] = [1, 2, 3, 4, 5]
    record["offsets"][:3] = [0, 2, 5]
    record["segments"][:2] = segments
    assert take(slots, 2, 5, pairs=pairs)[0] == code


def test_a_slot_of_another_model_or_a_cancelled_one_is_refused_unread():
    slots = new_slots()
    slots[0]["tokens"][:2] = [1, 2]
    slots[0]["offsets"][:2] = [0, 2]
    assert take(slots, 1, 2, model=1)[0] == SlotError.BAD_MODEL
    slots[0]["cancel"] = 1  # its waiter gave generation 1 up
    assert take(slots, 1, 2)[0] == SlotError.CANCELLED
