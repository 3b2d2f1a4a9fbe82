"""The client and a real sidecar process (tiny model) through real POSIX
shared memory and semaphores."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import numpy as np
import posix_ipc
import pytest

from shm_protocol import (
    EmbeddingClient,
    InvalidInput,
    LayoutMismatch,
    RequestTooLarge,
    ShmEmbedError,
    SidecarUnavailable,
    SlotRejected,
)
from shm_protocol.config import Settings
from shm_protocol.layout import HEADER_DTYPE, SLOT_READY, SlotError
from shm_protocol.region import Region
from shm_protocol.segments import DEV_SHM, Names, Segment
from tests.helpers import REPO, client_for, cosine_rows, new_namespace

TEXTS = ["", "hello", "Ünïcödé straße 東京", "emoji 🎉🚀 party", "word " * 400,
         "The quick brown fox jumps over the lazy dog."]


def test_vectors_equal_sentence_transformers(tiny_sidecar, tiny_st):
    with client_for(tiny_sidecar) as c:
        got = c.embed(TEXTS)
    ref = tiny_st.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert cosine_rows(got, ref).min() >= 0.99999


def test_request_larger_than_a_slot_is_split_and_kept_in_order(tiny_sidecar, tiny_st):
    texts = [f"document {i} " + "lorem ipsum " * (i % 37) for i in range(1000)]
    with client_for(tiny_sidecar) as c:
        res = c.embed_detailed(texts)
        assert res.token_counts.tolist()[:3] == [len(e.ids) for e in c.tokenize(texts[:3])]
    assert res.slots_used > c.settings.slots_per_ring  # more parts than slots: pipelined reuse
    assert cosine_rows(res.vectors, tiny_st.encode(texts)).min() >= 0.99999


def test_encode_is_a_drop_in_for_sentence_transformers(tiny_sidecar, tiny_st):
    with client_for(tiny_sidecar) as c:
        one = c.encode("a single sentence")
        many = c.encode(["a", "b c"], batch_size=1, show_progress_bar=False, normalize_embeddings=True)
        assert c.get_sentence_embedding_dimension() == tiny_st.get_embedding_dimension()
    assert one.shape == (tiny_st.get_embedding_dimension(),)
    assert cosine_rows([one], [tiny_st.encode("a single sentence")])[0] >= 0.99999
    assert np.allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-5)
    assert np.allclose(many, tiny_st.encode(["a", "b c"], normalize_embeddings=True), atol=1e-5)


def test_empty_list_and_bad_types(tiny_sidecar):
    with client_for(tiny_sidecar) as client:
        assert client.embed([]).shape == (0, client.dimension)
        with pytest.raises(InvalidInput):
            client.embed("not a list")
        with pytest.raises(InvalidInput, match=r"texts\[1\]"):
            client.embed(["ok", 3])
        with pytest.raises(RequestTooLarge) as err:
            client.embed(["word " * 400], truncate=False)
        assert err.value.limit == 256 and err.value.actual > 256
        assert isinstance(err.value, ShmEmbedError)
        assert client.embed(["still serving"]).shape == (1, client.dimension)


def test_objects_are_owner_only(tiny_sidecar):
    entries = tiny_sidecar.names.dev_shm_entries()
    assert any(e.endswith("-ctl") for e in entries) and any(e.startswith("sem.") for e in entries)
    for e in entries:
        assert stat.S_IMODE(os.stat(DEV_SHM / e).st_mode) == 0o600, e


def test_no_sidecar_raises_sidecar_unavailable():
    with pytest.raises(SidecarUnavailable):
        EmbeddingClient.connect(Settings.from_env({}, namespace=new_namespace()))
    lazy = EmbeddingClient.connect(Settings.from_env({}, namespace=new_namespace()), lazy=True)
    with pytest.raises(SidecarUnavailable):
        lazy.embed(["x"])


def test_layout_version_mismatch_is_a_typed_error():
    names = Names(new_namespace())
    seg = Segment.create(names.ctl, HEADER_DTYPE.itemsize + 64, mode=0o600)
    try:
        h = np.frombuffer(seg.mm, HEADER_DTYPE, 1).reshape(())
        h["magic"] = b"SHMEMBED"
        h["version"] = 999
        del h
        with pytest.raises(LayoutMismatch, match="999"):
            EmbeddingClient.connect(Settings.from_env({}, namespace=names.namespace))
    finally:
        seg.close()
        posix_ipc.unlink_shared_memory(names.ctl)


def test_a_bad_slot_fails_alone_and_the_sidecar_keeps_serving(tiny_sidecar):
    """Write garbage straight into a real slot of a ring leased to this test."""
    with client_for(tiny_sidecar) as good, client_for(tiny_sidecar) as bad:
        sess = bad._get_session()
        slot = sess.take_slot(1)
        vocab = sess.params.vocab_size
        sess.slot_views.tokens[slot, :3] = [101, vocab + 5, 102]  # an id past the vocabulary
        sess.slot_views.offsets[slot, :2] = [0, 3]
        sess.slot_views.n_texts[slot] = 1
        sess.slot_views.n_tokens[slot] = 3
        sess.seq[slot] = 7
        sess.slot_views.submit_ns[slot] = time.monotonic_ns()
        sess.state[slot] = SLOT_READY
        sess.bell.post()
        vecs = good.embed(["a good request beside a bad one"])
        assert sess.sems[slot].wait(10)
        assert int(sess.slot_views.error[slot]) == SlotError.BAD_TOKEN
        assert vecs.shape == (1, good.dimension) and np.isfinite(vecs).all()
        sess.give_back(slot)
        assert good.embed(["after"]).shape == (1, good.dimension)
    assert tiny_sidecar.proc.poll() is None


def test_sidecar_error_code_becomes_typed_exception(tiny_sidecar):
    """A slot whose offsets lie is answered with SlotRejected, not a hang.
    The lie is written before the slot is READY (tampering after the
    doorbell would race the sidecar)."""
    with client_for(tiny_sidecar) as client:
        sess = client._get_session()
        slot = sess.take_slot(1)
        views = sess.slot_views
        views.tokens[slot, :2] = [101, 102]
        views.offsets[slot, :2] = [0, 5]  # offsets[-1] != n_tokens
        views.n_texts[slot] = 1
        views.n_tokens[slot] = 2
        seq = 4242
        views.seq[slot] = seq
        views.state[slot] = SLOT_READY
        sess.bell.post()
        with pytest.raises(SlotRejected) as err:
            sess._collect(slot, seq, np.empty((1, client.dimension), np.float32))
        assert err.value.code == SlotError.BAD_OFFSETS


def test_threads_of_one_process_share_the_ring(tiny_sidecar, tiny_st):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"thread text {i}" for i in range(64)]
    ref = tiny_st.encode(texts)
    with client_for(tiny_sidecar) as c:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: (i, c.embed(texts[i: i + 3])), range(0, 60, 3)))
    for i, vecs in results:
        assert cosine_rows(vecs, ref[i: i + 3]).min() >= 0.99999


CHILD = r"""
import os, sys
from shm_protocol import EmbeddingClient, Settings
c = EmbeddingClient.connect(Settings.from_env())
v = c.embed(["from a child"])
print(c.info()["ring"], v.shape[1])
os._exit(0)  # no close: the sidecar must reap this ring
"""


def test_dead_process_ring_is_reaped(tiny_sidecar):
    region = Region.attach(tiny_sidecar.names, readonly=True, with_data=False)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD], env=tiny_sidecar.env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        ring = int(out.stdout.split()[0])
        deadline = time.monotonic() + 5
        while int(region.rings[ring]["owner_pid"]) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(region.rings[ring]["owner_pid"]) == 0
        assert int(region.header["stats"]["rings_reaped"]) >= 1
    finally:
        region.close()


def test_forked_child_gets_its_own_ring(tiny_sidecar):
    with client_for(tiny_sidecar) as client:
        parent_ring = client.info()["ring"]
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                ring = client.info()["ring"]
                ok = client.embed(["child"]).shape == (1, client.dimension)
                os.write(write_fd, f"{ring} {int(ok)}".encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        _, status = os.waitpid(pid, 0)
        child_ring, ok = map(int, os.read(read_fd, 100).split())
        assert status == 0 and ok == 1
        assert child_ring != parent_ring
        assert client.info()["ring"] == parent_ring
        assert client.embed(["parent"]).shape == (1, client.dimension)


def test_second_sidecar_on_a_live_namespace_refuses(tiny_sidecar, tmp_path):
    env = dict(tiny_sidecar.env)
    out = subprocess.run([sys.executable, "-m", "sidecar"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "already serves" in out.stderr
    with client_for(tiny_sidecar) as c:  # the first one is untouched
        assert c.embed(["ok"]).shape == (1, c.dimension)


def test_stale_objects_of_a_crashed_sidecar_are_reaped(fresh_tiny_sidecar):
    import signal

    sc = fresh_tiny_sidecar()
    sc.stop(signal.SIGKILL)
    assert sc.names.dev_shm_entries(), "SIGKILL leaves objects behind"
    sc2 = fresh_tiny_sidecar(namespace=sc.settings.namespace)
    with client_for(sc2) as c:
        assert c.embed(["after reaping"]).shape == (1, c.dimension)


def test_clean_stop_answers_in_flight_and_unlinks_everything(fresh_tiny_sidecar):
    import signal
    import threading

    sc = fresh_tiny_sidecar()
    results, errors = [], []
    client = client_for(sc)

    def hammer():
        for _ in range(200):
            try:
                results.append(client.embed(["in flight " * 20] * 10).shape)
            except SidecarUnavailable as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert sc.stop(signal.SIGTERM) == 0
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert results, "requests were served before the stop"
    assert sc.names.dev_shm_entries() == []
    client.close()


def test_two_namespaces_do_not_touch_each_other(fresh_tiny_sidecar):
    a = fresh_tiny_sidecar()
    b = fresh_tiny_sidecar(namespace=a.settings.namespace + "-s1")
    a.stop()
    assert a.names.dev_shm_entries() == []
    assert b.names.dev_shm_entries(), "b's objects survive a's stop"
    with client_for(b) as c:
        assert c.embed(["b serves"]).shape == (1, c.dimension)


def test_a_batch_is_cut_into_calls_of_the_measured_or_set_size(fresh_tiny_sidecar, tiny_st):
    """SHM_EMBED_CALL_ROWS caps the texts of one model call (16 texts in one
    request: 4 calls of 4); by default each model's is measured at start and
    logged with the rates it was chosen from."""
    texts = [f"call rows {i}" for i in range(16)]
    sc = fresh_tiny_sidecar(SHM_EMBED_CALL_ROWS="4")
    with client_for(sc) as client:
        before = client.stats().counters["batches"]
        got = client.embed(texts)
        deadline = time.monotonic() + 5  # the sidecar answers first and counts after
        while client.stats().counters["batches"] - before < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert client.stats().counters["batches"] - before == 4
    assert cosine_rows(got, tiny_st.encode(texts)).min() >= 0.99999
    measured = fresh_tiny_sidecar(SHM_EMBED_CALL_ROWS="0")
    log = measured.log.read_text()
    assert "texts/s by texts per call" in log and "calls of at most" in log, log[-2000:]
    # Refined while serving: the sizes learnt per width are logged at stop.
    with client_for(measured) as c:
        assert cosine_rows(c.embed(texts), tiny_st.encode(texts)).min() >= 0.99999
    measured.stop()
    assert "texts per call learnt: " in measured.log.read_text(), measured.log.read_text()[-2000:]
