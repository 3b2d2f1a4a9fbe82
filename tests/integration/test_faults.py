"""Faults injected for real: signals to real processes, other users."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from shm_protocol import SidecarUnavailable
from shm_protocol.errors import ShmEmbedError
from tests.helpers import client_for, cosine_rows


def _hammer(client, stop, outcomes, texts):
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            client.embed(texts)
            outcomes.append(("ok", time.monotonic() - t0))
        except SidecarUnavailable:
            outcomes.append(("unavailable", time.monotonic() - t0))
        except ShmEmbedError as exc:  # anything else is a failure of the test
            outcomes.append((repr(exc), time.monotonic() - t0))


def test_sidecar_sigkill_mid_batch_fails_fast_then_recovers(fresh_tiny_sidecar, tiny_st):
    sc = fresh_tiny_sidecar()
    clients = [client_for(sc) for _ in range(3)]
    outcomes: list = []
    stop = threading.Event()
    texts = ["kill me " * 30] * 40
    threads = [threading.Thread(target=_hammer, args=(c, stop, outcomes, texts)) for c in clients for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    sc.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    sc.proc.wait()
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a request hung after the sidecar died"
    kinds = {k for k, _ in outcomes}
    assert kinds <= {"ok", "unavailable"}, kinds
    failed = [d for k, d in outcomes if k == "unavailable"]
    assert failed, "requests in flight at the kill must fail"
    assert max(failed) < 1.0 + 0.5, f"slowest failure took {max(failed):.2f}s"
    assert time.monotonic() - killed_at < 5
    # A new sidecar (new epoch): every client re-attaches on its next call.
    sc2 = fresh_tiny_sidecar(namespace=sc.settings.namespace)
    for client in clients:
        got = client.embed(["back again"])
        assert cosine_rows(got, tiny_st.encode(["back again"]))[0] >= 0.99999
        client.close()
    assert sc2.proc.poll() is None


def test_sigstop_is_noticed_and_sigcont_serves_again(fresh_tiny_sidecar):
    sc = fresh_tiny_sidecar()
    client = client_for(sc, stale_after_s=0.5)
    assert client.embed(["before"]).shape[0] == 1
    sc.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(0.8)
        t0 = time.monotonic()
        with pytest.raises(SidecarUnavailable, match="heartbeat"):
            client.embed(["while stopped"])
        assert time.monotonic() - t0 < 0.5, "a stopped sidecar is refused at once, not waited for"
    finally:
        sc.proc.send_signal(signal.SIGCONT)
    time.sleep(0.3)
    assert client.embed(["after"]).shape[0] == 1
    client.close()


def test_request_waiting_when_sidecar_stops_fails_within_bound(fresh_tiny_sidecar):
    sc = fresh_tiny_sidecar()
    client = client_for(sc, stale_after_s=0.5)
    result = {}

    def big():
        t0 = time.monotonic()
        try:
            client.embed(["long wait " * 50] * 3000)
            result["outcome"] = "ok"
        except SidecarUnavailable:
            result["outcome"] = "unavailable"
        result["t"] = time.monotonic() - t0

    th = threading.Thread(target=big)
    th.start()
    time.sleep(0.3)
    sc.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    th.join(10)
    sc.proc.send_signal(signal.SIGCONT)
    assert not th.is_alive()
    assert result["outcome"] == "unavailable"
    assert time.monotonic() - stopped_at < 2.0
    client.close()


def test_another_user_cannot_open_the_segments(tiny_sidecar):
    """As user nobody, reading any of the namespace's objects is refused by the kernel."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user (nobody)")
    from shm_protocol.segments import DEV_SHM

    def as_nobody():
        os.setgid(65534)
        os.setgroups([])
        os.setuid(65534)

    entries = tiny_sidecar.names.dev_shm_entries()
    assert any(e.endswith("-ctl") for e in entries) and any(e.startswith("sem.") for e in entries)
    for e in entries:
        out = subprocess.run(["cat", str(DEV_SHM / e)], capture_output=True, preexec_fn=as_nobody, timeout=30)
        assert out.returncode != 0 and b"Permission denied" in out.stderr, e
    # The owner can, which shows the refusal is the mode and not something else.
    assert subprocess.run(["cat", str(DEV_SHM / entries[0])], capture_output=True, timeout=30).returncode == 0


def test_group_access_when_configured(fresh_tiny_sidecar):
    import grp
    import stat

    group = grp.getgrgid(os.getgid()).gr_name
    sc = fresh_tiny_sidecar(SHM_EMBED_GROUP=group)
    from shm_protocol.segments import DEV_SHM

    for e in sc.names.dev_shm_entries():
        st = os.stat(DEV_SHM / e)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid(), e


def test_random_bytes_in_a_real_slot_fail_alone(tiny_sidecar, tiny_st):
    """Garbage written straight into a leased slot: that slot alone fails (or,
    if the bytes happen to be valid, it is answered); the sidecar keeps serving."""
    from shm_protocol.layout import SLOT_DONE, SLOT_ERROR, SLOT_READY

    rng = np.random.default_rng(3)
    with client_for(tiny_sidecar) as bad, client_for(tiny_sidecar) as good:
        sess = bad._get_session()
        for trial in range(20):
            slot = sess.take_slot(1)
            raw = sess.region.slots[sess.ring, slot]
            view = raw.view(np.uint8) if raw.ndim else np.frombuffer(raw.tobytes(), np.uint8)
            buf = np.frombuffer(sess.region._data.mm, np.uint8)
            item = sess.params.slot_dtype.itemsize
            start = (sess.ring * sess.params.slots_per_ring + slot) * item
            buf[start: start + item] = rng.integers(0, 256, item, dtype=np.uint8)
            if trial % 2:  # sometimes plausible counts with garbage offsets and ids
                sess.slot_views.n_texts[slot] = rng.integers(1, 5)
                sess.slot_views.n_tokens[slot] = rng.integers(1, 50)
            sess.state[slot] = SLOT_READY
            sess.bell.post()
            want = [f"good {trial}"]
            assert cosine_rows(good.embed(want), tiny_st.encode(want))[0] >= 0.99999
            deadline = time.monotonic() + 5
            while int(sess.state[slot]) not in (SLOT_DONE, SLOT_ERROR) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert int(sess.state[slot]) in (SLOT_DONE, SLOT_ERROR)
            sess.give_back(slot)
            del view, buf
    assert tiny_sidecar.proc.poll() is None
