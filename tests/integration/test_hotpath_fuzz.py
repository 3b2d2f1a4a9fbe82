"""Random bytes written into slots under load, against the compiled take:
the sidecar never crashes, no good request gets a wrong vector or fails, and
each bad slot is answered alone (an error code, or a vector when the bytes
happen to make a valid request)."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from shm_protocol.layout import SLOT_DONE, SLOT_ERROR, SLOT_READY, SlotError
from tests.helpers import client_for, synthetic_reference

SECONDS = 6.0


def _good_worker(settings, seed: int, seconds: float, out) -> None:
    """Embeds for ``seconds``, checking each vector against the synthetic
    backend's own for its text; reports (answers, wrong, failed)."""
    from shm_protocol.client import EmbeddingClient

    rng = np.random.default_rng(seed)
    answers = wrong = failed = 0
    with EmbeddingClient.connect(settings) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            texts = [f"good {seed} {int(x)}" for x in rng.integers(0, 10**9, rng.integers(1, 4))]
            try:
                got = client.embed(texts)
            except Exception:
                failed += 1
                continue
            answers += 1
            wrong += int(not np.allclose(got, synthetic_reference(client, texts), atol=1e-6))
    out.put((answers, wrong, failed))


def test_random_bytes_in_slots_under_load_fail_alone(synthetic_sidecar):
    sc = synthetic_sidecar(200)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    good = [ctx.Process(target=_good_worker, args=(sc.settings, seed, SECONDS, results)) for seed in (1, 2)]
    for proc in good:
        proc.start()
    rng = np.random.default_rng(9)
    hostile_slots = answered = 0
    codes: dict[int, int] = {}
    with client_for(sc) as bad:
        sess = bad._get_session()
        item = sess.params.slot_dtype.itemsize
        data = np.frombuffer(sess.region._data.mm, np.uint8)
        spr = sess.params.slots_per_ring
        time.sleep(1.0)  # the good workers are attached and busy
        end = time.monotonic() + SECONDS - 2
        while time.monotonic() < end:
            slot = sess.take_slot(1)
            assert slot is not None
            start = (sess.ring * spr + slot) * item
            data[start: start + item] = rng.integers(0, 256, item, dtype=np.uint8)
            if hostile_slots % 2:  # plausible counts: the offsets, ids and splits get checked
                sess.slot_views.n_texts[slot] = rng.integers(1, 5)
                sess.slot_views.n_tokens[slot] = rng.integers(1, 60)
                sess.slot_views.model[slot] = 0
            sess.slot_views.cancel[slot] = 0
            sess.slot_views.seq[slot] = 10**12 + hostile_slots
            sess.state[slot] = SLOT_READY
            sess.bell.post()
            hostile_slots += 1
            deadline = time.monotonic() + 5
            while int(sess.state[slot]) not in (SLOT_DONE, SLOT_ERROR) and time.monotonic() < deadline:
                time.sleep(0.0005)
            state = int(sess.state[slot])
            assert state in (SLOT_DONE, SLOT_ERROR), f"hostile slot {hostile_slots} never answered"
            answered += 1
            code = int(sess.slot_views.error[slot]) if state == SLOT_ERROR else 0
            codes[code] = codes.get(code, 0) + 1
            sess.give_back(slot)
        del data
    totals = [results.get(timeout=60) for _ in good]
    for proc in good:
        proc.join(30)
        assert proc.exitcode == 0
    assert sc.proc.poll() is None, "the sidecar died"
    assert hostile_slots >= 50 and answered == hostile_slots
    assert set(codes) - {0} <= {int(e) for e in SlotError}, codes
    assert sum(v for k, v in codes.items() if k) > hostile_slots // 2, codes  # random bytes are mostly refused
    assert all(answers > 20 and wrong == 0 and failed == 0 for answers, wrong, failed in totals), totals
