"""The compiled hot path against the layout it is given: what C writes,
numpy reads at the layout's offsets, and the reverse; its semaphores; its
tokenizer against the tokenizers library; a build that cannot load."""

from __future__ import annotations

import mmap
import os
import random
import string
import subprocess
import sys
import uuid

import numpy as np
import posix_ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm_protocol import hotpath
from shm_protocol.errors import SidecarUnavailable
from shm_protocol.layout import (
    SLOT_BUSY,
    SLOT_DONE,
    SLOT_ERROR,
    SLOT_READY,
    LayoutParams,
    SlotError,
    slots_view,
)
from shm_protocol.model_files import bundled_model_path, tokenizer_file
from shm_protocol.session import ROW_MARK, slot_error
from shm_protocol.tokenizer import WorkerTokenizer

LAYOUTS = [
    LayoutParams(n_rings=2, slots_per_ring=3, max_texts=4, max_tokens=64, dim=3, max_seq_length=10, vocab_size=100),
    LayoutParams(n_rings=1, slots_per_ring=2, max_texts=64, max_tokens=4096, dim=384, max_seq_length=256,
                 vocab_size=30522),
]


def new_slots(params: LayoutParams) -> np.ndarray:
    return slots_view(mmap.mmap(-1, params.data_bytes), params).reshape(-1)


@pytest.mark.parametrize("params", LAYOUTS)
def test_what_c_submits_numpy_reads_at_the_layouts_offsets(params):
    slots = new_slots(params)
    ring = hotpath.ring(slots)
    flat = len(slots) - 1  # the last slot: an offset error would read past the others
    ids = np.arange(5, 5 + min(params.max_tokens, 12), dtype=np.int32)
    lengths = [len(ids) - 2, 2] if params.max_texts > 1 else [len(ids)]
    assert ring.submit(flat, ids, np.array(lengths), 1, [0, 1][: len(lengths)], 987654321, True, None)
    slot = slots[flat]
    assert int(slot["state"]) == SLOT_READY and int(slot["seq"]) == 987654321 and int(slot["model"]) == 1
    assert int(slot["n_texts"]) == len(lengths) and int(slot["n_tokens"]) == len(ids)
    assert slot["offsets"][: len(lengths) + 1].tolist() == [0, *np.cumsum(lengths).tolist()]
    assert slot["tokens"][: len(ids)].tolist() == ids.tolist()
    assert slot["segments"][: len(lengths)].tolist() == [0, 1][: len(lengths)]
    assert int(slot["eta_ns"]) == 0 and int(slot["error"]) == 0 and int(slot["submit_ns"]) > 0
    assert all(int(other["state"]) == 0 for other in slots[:flat])  # nothing written elsewhere


@pytest.mark.parametrize("params", LAYOUTS)
def test_what_c_publishes_numpy_reads_and_only_to_its_generation(params):
    slots = new_slots(params)
    ring = hotpath.ring(slots)
    flat = len(slots) - 1
    slot = slots[flat]
    slot["seq"] = 42
    slot["state"] = SLOT_BUSY
    assert ring.publish(flat, 41, 0, 1, 2, 3, None) == (False, False)  # another generation: nothing written
    assert int(slot["state"]) == SLOT_BUSY and int(slot["queue_ns"]) == 0
    assert ring.publish(flat, 42, int(SlotError.TOO_LONG), 111, 222, 7, None) == (True, False)
    assert int(slot["state"]) == SLOT_ERROR and int(slot["error"]) == SlotError.TOO_LONG
    assert (int(slot["queue_ns"]), int(slot["compute_ns"]), int(slot["batch_texts"])) == (111, 222, 7)
    assert ring.answered(flat, 42) and not ring.answered(flat, 41)
    slot["state"] = SLOT_BUSY
    assert ring.publish(flat, 42, 0, 1, 2, 3, None)[0] and int(slot["state"]) == SLOT_DONE


@pytest.mark.parametrize("params", LAYOUTS)
def test_what_numpy_writes_c_takes_at_the_layouts_offsets(params):
    slots = new_slots(params)
    flat = len(slots) - 1
    slot = slots[flat]
    ids = [7, 8, 9, 10]
    slot["tokens"][:4] = ids
    slot["offsets"][:3] = [0, 1, 4] if params.max_texts > 1 else [0, 4, 0]
    slot["n_texts"] = 2 if params.max_texts > 1 else 1
    slot["n_tokens"], slot["seq"], slot["model"] = 4, 5, 0
    code, seq, n, got_ids, offs, splits = hotpath.ring(slots).take(flat, 0, params.max_seq_length,
                                                                   params.vocab_size, False)
    assert (code, seq, n) == (SlotError.NONE, 5, int(slot["n_texts"])) and int(slot["state"]) == SLOT_BUSY
    assert np.frombuffer(got_ids, np.int32).tolist() == ids
    assert np.frombuffer(offs, np.int64).tolist() == slot["offsets"][: n + 1].tolist()
    assert splits is None


def test_a_ring_refuses_a_geometry_its_arrays_do_not_fit():
    params = LAYOUTS[0]
    slots = new_slots(params)
    offsets = hotpath.field_offsets(slots.dtype)
    with pytest.raises(ValueError, match="do not fit"):
        hotpath.load().Ring(slots.view(np.uint8), slots.dtype.itemsize, offsets, params.max_texts,
                            params.max_tokens * 100, params.dim)
    with pytest.raises(ValueError, match="outside the slot"):
        hotpath.load().Ring(slots.view(np.uint8), slots.dtype.itemsize, {**offsets, "out": 1 << 30},
                            params.max_texts, params.max_tokens, params.dim)


def test_submit_refuses_more_than_a_slot_holds_and_leaves_the_slot_unready():
    params = LAYOUTS[0]
    slots = new_slots(params)
    ring = hotpath.ring(slots)
    with pytest.raises(ValueError):
        ring.submit(0, list(range(params.max_tokens + 1)), [params.max_tokens + 1], 0, None, 1, True, None)
    with pytest.raises(ValueError, match="add up"):
        ring.submit(0, [1, 2, 3], [2], 0, None, 1, True, None)
    with pytest.raises(OverflowError):
        ring.submit(0, [1, 2 ** 40], [2], 0, None, 1, True, None)
    assert int(slots[0]["state"]) != SLOT_READY


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=0, max_size=4096), n_texts=st.integers(0, 70), n_tokens=st.integers(0, 5000),
       pairs=st.booleans())
def test_random_bytes_in_a_slot_never_crash_the_take_and_a_valid_verdict_is_safe(raw, n_texts, n_tokens, pairs):
    params = LAYOUTS[0]
    slots = new_slots(params)
    buf = slots.view(np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)[: len(buf)]
    slots[0]["n_texts"], slots[0]["n_tokens"], slots[0]["model"] = n_texts, n_tokens, 0
    slots[0]["cancel"] = int(slots[0]["seq"]) + 1
    code, _, n, ids, offs, splits = hotpath.ring(slots).take(0, 0, params.max_seq_length, params.vocab_size, pairs)
    if code == SlotError.NONE:
        ids, offs = np.frombuffer(ids, np.int32), np.frombuffer(offs, np.int64)
        assert 1 <= n <= params.max_texts and len(ids) == offs[-1] == n_tokens
        assert ids.min() >= 0 and ids.max() < params.vocab_size
        assert (np.diff(offs) >= 1).all() and (np.diff(offs) <= params.max_seq_length).all()
        assert splits is None or (pairs and all(0 <= x < b - a for x, a, b in zip(splits, offs, offs[1:])))
    else:
        assert ids is None and offs is None


def test_semaphores_post_wait_time_out_drain_and_spin():
    name = f"/shm-embed-unit-{uuid.uuid4().hex[:8]}"
    made = posix_ipc.Semaphore(name, posix_ipc.O_CREX, 0o600, 0)
    try:
        sem = hotpath.semaphore(name)
        assert not sem.trywait()
        assert sem.wait(0.01) is False
        for _ in range(5):
            sem.post()
        assert sem.value() == 5 and sem.drain(3) == 3 and sem.drain(100) == 2
        assert sem.spin(hotpath.load().monotonic_ns() + 1_000_000) is False
        made.release()  # a post through the other handle: the same semaphore
        assert sem.wait(1.0) is True
        sem.close()
        with pytest.raises(ValueError, match="closed"):
            sem.post()
        with pytest.raises(SidecarUnavailable):
            hotpath.semaphore(name + "-absent")
    finally:
        made.close()
        posix_ipc.unlink_semaphore(name)


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "Quick", "BROWN", "fox's", "jumps", "over-the", "lazy", "dog.", "e-mail:", "$3.50",
             "antidisestablishmentarianism", "x" * 120, "http://a.b/c?d=1", "[mask]", "COVID-19", "re-use", "3.14"]
    out = []
    for _ in range(n):
        k = rng.random()
        if k < 0.4:
            out.append("".join(rng.choice(string.printable) for _ in range(rng.randint(0, 80))))
        elif k < 0.7:
            out.append(" ".join("".join(rng.choice(string.ascii_letters + "'-.,!?0123456789")
                                        for _ in range(rng.randint(1, 14))) for _ in range(rng.randint(1, 40))))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 300))))
    return out


def test_the_compiled_tokenizer_gives_the_librarys_ids_or_steps_aside():
    """Token for token what the model's tokenizer.json gives, truncation
    included; texts it does not handle (not ASCII, control characters, an
    added token's text) go to the library."""
    tok = WorkerTokenizer(str(tokenizer_file(bundled_model_path())), 256)
    assert tok._fast is not None
    checked = 0
    for text in _texts(4000, seed=5) + ["", " ", "[CLS] x", "a\x0bb", "naïve café", "x" * 101, "x" * 100]:
        fast = tok._encode_fast([text], truncate=True)
        if fast is None:
            assert not text.isascii() or any(a in text for a in tok._added) or any(
                ord(c) < 32 and c not in "\t\n\r" or ord(c) == 127 for c in text)
            continue
        checked += 1
        assert fast[0] == tok._tok.encode(text).ids, text
    assert checked > 3000  # printable ASCII has vertical tabs and form feeds: the library takes those


def test_a_tokenizer_of_another_shape_has_no_compiled_path():
    import json

    spec = json.loads(open(tokenizer_file(bundled_model_path())).read())
    assert hotpath.wordpiece(json.dumps(spec)) is not None
    for key, value in (("normalizer", None), ("pre_tokenizer", {"type": "Whitespace"}),
                       ("post_processor", {"type": "RobertaProcessing"})):
        assert hotpath.wordpiece(json.dumps({**spec, key: value})) is None
    assert hotpath.wordpiece("not json") is None


def test_a_build_that_cannot_load_stops_the_sidecar_at_start_naming_the_fix(tmp_path):
    """As a foreign or half-built extension does: the sidecar exits 1 before
    it creates anything, and its log says what to run."""
    code = ("import sys; sys.modules['shm_protocol._hotpath'] = None; "
            "from sidecar.__main__ import main; sys.exit(main())")
    env = {**os.environ, "SHM_EMBED_NAMESPACE": f"shm-embed-unit-{uuid.uuid4().hex[:8]}",
           "SHM_EMBED_SYNTHETIC_US": "0"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "pip install -e ." in r.stderr and "python3-dev" in r.stderr
    assert not [e for e in os.listdir("/dev/shm") if env["SHM_EMBED_NAMESPACE"] in e]


@pytest.mark.parametrize("error", [0, 0xFFFFFFFF, 0xFFFFFFFE])
def test_an_error_slot_without_a_real_code_is_refused_never_read_as_vectors(error):
    """Someone sets a submitted slot to ERROR with code 0 (or one that would
    read as the reader's own signals): the reader refuses it and copies nothing."""
    params = LAYOUTS[1]
    slots = new_slots(params)
    ring = hotpath.ring(slots)
    ring.submit(0, [101, 7, 102], [3], 0, None, 77, True, None, params.dim, ROW_MARK)
    slots[0]["out"][0, :] = 0.5
    slots[0]["state"], slots[0]["error"] = SLOT_ERROR, error
    out = np.full((1, params.dim), -1.0, np.float32)
    code, _, _ = ring.collect(0, 77, out, ROW_MARK)
    assert code > 0 and slot_error(code).__class__.__name__ == "SlotRejected"
    assert (out == -1.0).all()


def test_a_tokenizer_whose_added_tokens_match_after_normalizing_has_no_compiled_path():
    import json

    spec = json.loads(open(tokenizer_file(bundled_model_path())).read())
    spec["added_tokens"] = [{**t, "normalized": True} if t["content"] == "[MASK]" else t
                            for t in spec["added_tokens"]]
    assert hotpath.wordpiece(json.dumps(spec)) is None
