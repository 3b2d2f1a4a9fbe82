"""The embedding cache with a real sidecar (tiny model): hits skip the
ring, counters reach stats, /metrics and /info, and bytes written into the
cache segment under load give misses, never a wrong vector."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from falcon import testing

from shm_protocol import long_inputs
from shm_protocol.cache import KEY_WORDS, read_cache_stats, text_key
from shm_protocol.layout import cache_key_material
from shm_protocol.segments import DEV_SHM
from tests.helpers import client_for, cosine_rows, start_sidecar, stop_and_check
from web.app import create_app
from web.metrics import make_registry, render


@pytest.fixture(scope="module")
def cache_sidecar(tiny_model, tmp_path_factory):
    """A tiny-model sidecar with a small cache (1 MiB), which a scribbler covers densely."""
    sc = start_sidecar(tmp_path_factory.mktemp("sc"), str(tiny_model), SHM_EMBED_TORCH_THREADS="1",
                       SHM_EMBED_CACHE_MB="1")
    yield sc
    stop_and_check(sc)


def sidecar_texts(client, expected: int) -> int:
    """Texts the sidecar has embedded (its ring traffic), once that is
    ``expected`` or 2 s have passed (it counts after it answers)."""
    deadline = time.monotonic() + 2
    while (texts := client.stats().counters["texts"]) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return texts


def test_hits_skip_the_ring_and_misses_alone_are_sent(cache_sidecar, tiny_st):
    with client_for(cache_sidecar) as c:
        first = c.embed_detailed(["cache one", "cache two"])
        assert first.slots_used == 1 and sidecar_texts(c, 2) == 2
        again = c.embed_detailed(["cache one", "cache two"])
        assert again.slots_used == 0 and np.array_equal(again.vectors, first.vectors)
        assert again.token_counts.tolist() == first.token_counts.tolist()
        mixed = c.embed_detailed(["cache three", "cache one"])
        assert sidecar_texts(c, 3) == 3  # only the miss went; the hits never did
        assert np.array_equal(mixed.vectors[1], first.vectors[0])
        # dimensions and normalize are the client's, applied after the hit
        unit = c.embed_detailed(["cache one"], normalize=True)
        assert unit.slots_used == 0
        assert np.allclose(unit.vectors, tiny_st.encode(["cache one"], normalize_embeddings=True), atol=1e-5)
        # another prompt is another key
        assert c.embed_detailed(["cache one"], prompt="query: ").slots_used == 1
        assert sidecar_texts(c, 4) == 4
        assert cosine_rows(mixed.vectors, tiny_st.encode(["cache three", "cache one"])).min() >= 0.99999
        stats = c.stats().cache
        assert stats["enabled"] and (stats["hits"], stats["misses"]) == (4, 4) and stats["inserts"] >= 3
        assert stats["bytes"] > 0 and c.info()["cache"]["hits"] == stats["hits"]


def test_cache_counters_in_stats_cli_metrics_and_info(cache_sidecar):
    with client_for(cache_sidecar) as c:
        c.embed(["counted"])
        c.embed(["counted"])
        out = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli", "--namespace",
                              cache_sidecar.settings.namespace, "--json"], env=cache_sidecar.env,
                             capture_output=True, text=True, timeout=60)
        cache = json.loads(out.stdout)["cache"]
        assert cache["enabled"] and cache["hits"] >= 1 and cache["inserts"] >= 1
        metrics = render(make_registry(c.stats, "test")).decode()
        for name in ("hits_total", "misses_total", "inserts_total", "evictions_total", "bytes"):
            assert f"shm_embed_cache_{name} " in metrics
        info = testing.TestClient(create_app(c, cache_sidecar.settings)).simulate_get("/info").json
        assert info["cache"]["enabled"] and info["cache"]["hits"] >= 1


SCRIBBLER = """
import mmap, os, sys, time, posix_ipc, random
shm = posix_ipc.SharedMemory(sys.argv[1])
mm = mmap.mmap(shm.fd, shm.size)
shm.close_fd()
start, end = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
rng = random.Random(1)
writes = 0
while time.monotonic() < end:
    at = rng.randrange(start, len(mm) - 64)
    mm[at: at + 8] = rng.randbytes(8)
    writes += 1
    if writes % 64 == 0:
        time.sleep(0.0005)
print(writes)
"""


def test_bytes_written_into_the_cache_under_load_never_give_a_wrong_vector(cache_sidecar):
    texts = [f"repeated text number {i}" for i in range(40)]
    with client_for(cache_sidecar) as c:
        reference = c.embed(texts)  # computed by the sidecar (misses)
        # Any two texts' vectors differ far more than the tolerance below.
        gaps = np.abs(reference[:, None, :] - reference[None, :, :]).max(axis=2)
        assert gaps[~np.eye(len(texts), dtype=bool)].min() > 1e-2
        geometry = c._get_session().cache.geometry
        before = c.stats().cache
        wrong, answers = [], [0]
        stop = threading.Event()

        def load(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                pick = rng.choice(len(texts), size=int(rng.integers(1, 6)))
                got = c.embed([texts[i] for i in pick])
                for row, i in zip(got, pick):
                    answers[0] += 1
                    if np.abs(row - reference[i]).max() > 1e-4:
                        wrong.append(int(i))

        threads = [threading.Thread(target=load, args=(seed,)) for seed in range(3)]
        for t in threads:
            t.start()
        scribbler = subprocess.run([sys.executable, "-c", SCRIBBLER, cache_sidecar.names.cache,
                                    str(geometry.rings_offset), "1.5"], capture_output=True, text=True, timeout=60)
        stop.set()
        for t in threads:
            t.join()
        assert scribbler.returncode == 0, scribbler.stderr
        after = c.stats().cache
    assert int(scribbler.stdout) > 1000
    assert wrong == [], f"{len(wrong)} wrong vectors of {answers[0]} answers"
    assert after["hits"] > before["hits"] and after["misses"] > before["misses"]
    assert cache_sidecar.proc.poll() is None


def test_cache_off_makes_no_segment_and_sends_everything(synthetic_sidecar):
    sc = synthetic_sidecar(SHM_EMBED_CACHE_MB="0")
    assert not (DEV_SHM / sc.names.cache.lstrip("/")).exists()
    with client_for(sc) as c:
        c.embed(["same"])
        assert c.embed_detailed(["same"]).slots_used == 1
        assert sidecar_texts(c, 2) == 2
        assert c.info()["cache"] == {"enabled": False} == read_cache_stats(sc.names)


def victim_key(client, text: str) -> tuple[int, int, int, int]:
    """``text``'s cache key (default model, no prompt, default long-input policy)."""
    sess = client._get_session()
    policy = long_inputs.resolve_policy(None, None, None, client.settings.long_inputs)
    return text_key(cache_key_material(sess.models[0].name, sess.epoch, None, policy), text)


def entry_of(client, key: tuple) -> tuple[int, int]:
    """(bucket, way) of the cache entry of ``key``, once the sidecar has stored it."""
    cache = client._get_session().cache
    lo = key[0]
    bucket = lo % cache.geometry.n_buckets
    deadline = time.monotonic() + 2
    while lo not in (tags := cache._tags[bucket].tolist()) and time.monotonic() < deadline:
        time.sleep(0.005)  # the sidecar stores once it has answered
    return bucket, tags.index(lo)


def test_a_plain_submit_never_stores_its_vector_under_an_earlier_requests_key(cache_sidecar):
    """Session.submit (the step-by-step API bench/hot_path.py uses) must not
    leave the slot's keys of an earlier embed_detailed behind: the sidecar
    would store this request's vector under another text's key, for every
    worker of the host."""
    victim, other = "the victim text", "a different text entirely"
    with client_for(cache_sidecar) as c:
        reference = c.embed_detailed([victim]).vectors[0].copy()  # a miss: its keys are in a slot now
        sess = c._get_session()
        key = victim_key(c, victim)
        slot = int(np.flatnonzero((sess._key_words[:, :KEY_WORDS] == np.array(key, np.uint64)).all(axis=1))[0])
        # Damage the entry (the documented recovery: the next miss of its key rewrites it).
        bucket, way = entry_of(c, key)
        raw = sess.cache._raw
        vector_at = int(sess.cache.geometry.entry_dtype.fields["vector"][1])
        raw[bucket, way, vector_at] ^= 0xFF
        # Another text, sent step by step in the same slot.
        taken = [sess.take_slot(None) for _ in range(sess.params.slots_per_ring)]
        assert slot in taken
        for s in taken:
            if s != slot:
                sess.give_back(s)
        tok = c._tokenizers[0].tokenize_request([other], prompt=None, truncate=True, max_tokens=None)
        seq = sess.submit(slot, tok.ids[0], np.array([len(tok.ids[0])], np.int64))
        sess._await_answer(slot, seq)
        sess.give_back(slot)
        # The sidecar stores after it answers: give it a moment, then look the victim up.
        for _ in range(50):
            got = c.embed_detailed([victim])
            if got.slots_used == 0:
                break
        assert np.array_equal(got.vectors[0], reference), "another text's vector came back for the victim"
