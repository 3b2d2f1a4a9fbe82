"""The protocol's lifecycle under the faults users meet: stalls, timeouts
followed by a close, tampered semaphores, a wedged loop, a stopped lock
holder, a full /dev/shm, a hostile ring, racing starts, racing attaches and
a corrupt header. Every fault is injected for real into a real sidecar of
the synthetic backend (its vectors are known exactly, so a wrong one is seen).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from shm_protocol import EmbeddingClient, Settings, SidecarUnavailable
from shm_protocol.errors import RingTableBusy, ShmEmbedError
from shm_protocol.layout import SidecarState
from shm_protocol.region import Region
from shm_protocol.segments import DEV_SHM, ORPHANED
from tests.helpers import REPO, client_for, leased_rings, new_namespace, sidecar_env, synthetic_reference

SEM_VALUE_MAX = 0x7FFFFFFF


def _set_semaphore_value(name: str, value: int) -> None:
    """Write a named semaphore's value straight into its /dev/shm file, as a
    hostile local process can (glibc keeps the value in the first 4 bytes)."""
    with open(DEV_SHM / f"sem.{name.lstrip('/')}", "r+b") as f:
        f.write(int(value).to_bytes(4, "little"))


def _wait_for(cond, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def test_stalls_keep_each_clients_ring_and_every_answer_right(synthetic_sidecar):
    """SIGSTOP/SIGCONT cycles under traffic: a client keeps its lease across a
    stall of the same sidecar, so leased rings never exceed live clients."""
    sc = synthetic_sidecar(us=2000)
    clients = [client_for(sc, stale_after_s=0.3) for _ in range(2)]
    rings = [c.info()["ring"] for c in clients]
    texts = [f"stall text {i}" for i in range(5)]
    ref = synthetic_reference(clients[0], texts)
    outcomes = {"ok": 0, "unavailable": 0, "wrong": 0, "other": []}
    stop = threading.Event()

    def hammer(client):
        while not stop.is_set():
            try:
                got = client.embed(texts)
                outcomes["ok" if np.allclose(got, ref, atol=1e-6) else "wrong"] += 1
            except SidecarUnavailable:
                outcomes["unavailable"] += 1
                time.sleep(0.01)
            except ShmEmbedError as exc:
                outcomes["other"].append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(c,)) for c in clients for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(6):
            time.sleep(0.3)
            sc.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.7)
            sc.proc.send_signal(signal.SIGCONT)
            assert len(leased_rings(sc.names)) <= len(clients)
        time.sleep(0.5)
    finally:
        sc.proc.send_signal(signal.SIGCONT)
        stop.set()
        for thread in threads:
            thread.join(10)
    assert outcomes["wrong"] == 0 and not outcomes["other"], outcomes
    assert outcomes["ok"] > 50 and outcomes["unavailable"] > 0, outcomes
    assert [c.info()["ring"] for c in clients] == rings, "a stall of the same sidecar must not move a client"
    assert len(leased_rings(sc.names)) == len(clients)
    for client in clients:
        client.close()
    assert leased_rings(sc.names) == []


def test_a_late_answer_never_reaches_the_next_holder_of_a_ring(synthetic_sidecar):
    """A request times out while its slot is in the model; its client closes
    (a worker exiting after a timeout); a new client starts at once. The new
    client must get its own vector, never the late one."""
    sc = synthetic_sidecar(us=1_500_000)
    first = client_for(sc, timeout_s=0.3)
    with pytest.raises(SidecarUnavailable):  # SidecarTimeout
        first.embed(["the first client's text"])
    first.close()
    held = leased_rings(sc.names)
    second = client_for(sc, timeout_s=10)
    want = ["the second client's text"]
    got = second.embed(want)
    assert np.allclose(got, synthetic_reference(second, want), atol=1e-6), "a late answer reached a new request"
    assert held != [], "the ring stays out of the pool while its slot is in the model"
    # Once the sidecar is done with the old slot, the old ring goes back to the pool.
    assert _wait_for(lambda: len(leased_rings(sc.names)) == 1, 5)
    second.close()
    assert _wait_for(lambda: leased_rings(sc.names) == [], 2)


def test_a_saturated_slot_semaphore_does_not_stop_the_sidecar(synthetic_sidecar):
    """A slot semaphore pushed to SEM_VALUE_MAX: the sidecar's post fails
    with EOVERFLOW; it logs, counts and keeps serving; the waiter still gets
    its answer and the client retires the tampered slot."""
    sc = synthetic_sidecar(us=0)
    client = client_for(sc)
    sess = client._get_session()
    want = ["answered despite the semaphore"]
    slot = sess.take_slot(1)
    _set_semaphore_value(sc.names.slot(sess.ring, slot), SEM_VALUE_MAX)
    ids = np.asarray(client.tokenize(want)[0].ids, np.int32)
    seq = sess.submit(slot, ids, np.array([len(ids)]))
    assert _wait_for(lambda: sess.answered(slot, seq), 5), "the slot is answered although its post failed"
    assert np.allclose(sess.slot_views.out[slot, :1], synthetic_reference(client, want), atol=1e-6)
    sess.give_back(slot)
    assert sc.proc.poll() is None, "the sidecar died of one failed post"
    for i in range(6):  # every slot of the ring, the tampered one included, is tried
        more = [f"after {i}"]
        assert np.allclose(client.embed(more), synthetic_reference(client, more), atol=1e-6)
    assert int(client.stats().counters["loop_errors"]) >= 1
    assert "posting slot" in sc.log_text()
    client.close()


RING_HOLDER = r"""
import os, sys
from shm_protocol import EmbeddingClient
c = EmbeddingClient.connect()
c.embed(["warm up"])
print(c.info()["ring"], flush=True)
sys.stdin.readline()
if sys.argv[1] == "closed":
    c.close()
os._exit(0)
"""


@pytest.mark.parametrize("how", ["killed", "closed"])
def test_saturated_slot_semaphores_do_not_outlive_the_lease(synthetic_sidecar, how):
    """Every slot semaphore of a worker's ring pushed to SEM_VALUE_MAX, then
    the worker is killed (the reaper frees the ring) or closes its client
    (it hands the ring back): the next holder of the ring is served, because
    the sidecar resets the semaphores before the ring is leased again. One
    ring only, so the next client cannot dodge the tampered one."""
    sc = synthetic_sidecar(us=0, SHM_EMBED_RINGS="1")
    holder = subprocess.Popen([sys.executable, "-c", RING_HOLDER, how], env=sc.env, cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ring = int(holder.stdout.readline())
        for k in range(sc.settings.slots_per_ring):
            _set_semaphore_value(sc.names.slot(ring, k), SEM_VALUE_MAX)
        if how == "killed":
            holder.kill()
        else:
            holder.stdin.write("go\n")
            holder.stdin.flush()
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    client = client_for(sc)
    try:
        assert client.info()["ring"] == ring
        for i in range(2 * sc.settings.slots_per_ring):  # every slot of the ring
            want = [f"next holder {i}"]
            assert np.allclose(client.embed(want), synthetic_reference(client, want), atol=1e-6)
        # Each semaphore replaced counts as a fault the loop survived (its log
        # line is rate-limited with the others, so the counter is the witness).
        assert int(client.stats().counters["loop_errors"]) >= sc.settings.slots_per_ring
    finally:
        client.close()


def test_an_inflated_doorbell_does_not_stall_the_loop(synthetic_sidecar):
    """60 million posts written into the doorbell: requests keep being
    answered at once, and the doorbell is replaced rather than drained."""
    sc = synthetic_sidecar(us=0)
    client = client_for(sc)
    want = ["ring the bell"]
    ref = synthetic_reference(client, want)
    assert np.allclose(client.embed(want), ref, atol=1e-6)
    _set_semaphore_value(sc.names.bell, 60_000_000)
    worst = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        assert np.allclose(client.embed(want), ref, atol=1e-6)
        worst = max(worst, time.monotonic() - t0)
    assert worst < 1.0, f"a request took {worst:.2f}s behind the inflated doorbell"
    other = client_for(sc)  # a client attached after the replacement posts to the new doorbell
    assert np.allclose(other.embed(want), ref, atol=1e-6)
    assert client.stats().unavailable is None
    client.close()
    other.close()


LOCK_HOLDER = r"""
import os, signal, sys
from shm_protocol.region import Region
from shm_protocol.segments import Names
region = Region.attach(Names(sys.argv[1]), with_data=False)
with region.lock_rings():
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""

def test_a_stopped_lock_holder_blocks_neither_the_loop_nor_attaches_forever(synthetic_sidecar):
    """A process stopped while it holds the ring-table lock, and a ring the
    reaper must free meanwhile: the batching loop keeps serving (the reaper
    does not wait for the lock), a new client gets RingTableBusy after the
    lock timeout instead of hanging, and the ring is reaped once the holder is gone."""
    sc = synthetic_sidecar(us=1000)
    client = client_for(sc)
    want = ["served while the table is locked"]
    ref = synthetic_reference(client, want)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, sc.settings.namespace], env=sc.env, cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    region = Region.attach(sc.names, with_data=False)
    try:
        assert holder.stdout.readline().strip() == "locked"
        orphan = region.params.n_rings - 1
        region.rings[orphan]["owner_pid"] = ORPHANED  # as Gunicorn's child_exit marks a dead worker's ring
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            assert np.allclose(client.embed(want), ref, atol=1e-6)
            assert time.monotonic() - t0 < 0.5
        assert client.stats().unavailable is None, "the loop kept its deadline"
        assert int(region.rings[orphan]["owner_pid"]) == ORPHANED, "nobody could reap under the held lock"
        t0 = time.monotonic()
        with pytest.raises(RingTableBusy):
            EmbeddingClient.connect(sc.settings)
        assert time.monotonic() - t0 < 5, "a new client waited out more than the lock timeout"
        holder.kill()
        holder.wait()
        assert _wait_for(lambda: int(region.rings[orphan]["owner_pid"]) == 0, 3), "ring reaped once unlocked"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        region.close()
    with client_for(sc) as late:
        assert np.allclose(late.embed(want), ref, atol=1e-6)
    client.close()


def test_a_wedged_loop_fails_fast_stops_the_watchdog_and_is_replaced(synthetic_sidecar, tmp_path):
    """A model call that never ends (a hung GPU, a deadlock): the heartbeat
    thread still runs, but the loop misses its deadline, so requests fail
    fast, the stats CLI says so, systemd's watchdog is no longer fed, and the
    sidecar removes its objects and exits for its supervisor to restart it."""
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.05)
    sc = synthetic_sidecar(us=60_000_000, SHM_EMBED_MODEL_CALL_MAX_S="0.5", SHM_EMBED_LOOP_STALL_S="0.5",
                           SHM_EMBED_WEDGE_EXIT_S="3", NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    try:
        def messages(seconds: float) -> list[str]:
            got, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    got.append(sock.recv(256).decode())
                except TimeoutError:
                    pass
            return got

        assert "WATCHDOG=1" in messages(0.6), "a healthy loop feeds the watchdog"
        client = client_for(sc, timeout_s=30)
        t0 = time.monotonic()
        with pytest.raises(SidecarUnavailable, match="wedged"):
            client.embed(["this call never ends"])
        assert time.monotonic() - t0 < 3, "a wedged loop must fail requests fast, not after the timeout"
        messages(0.1)  # what was sent before the wedge
        stats = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli", "--json"], env=sc.env, cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert stats.returncode == 1 and "wedged" in json.loads(stats.stdout)["status"], stats.stdout
        assert "WATCHDOG=1" not in messages(0.6), "the watchdog is still fed while the loop is wedged"
        assert sc.proc.wait(15) == 70
        assert sc.names.dev_shm_entries() == [], "a sidecar that gives up removes its objects"
        client.close()
    finally:
        sock.close()


def test_a_dev_shm_too_small_is_refused_at_start_with_the_sizes(tmp_path):
    """A 2 MiB /dev/shm (containers often have 64 MiB) in a private mount
    namespace: the sidecar refuses to start and says what it needs, instead
    of starting and dying of SIGBUS at its first request."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to give the sidecar a small private /dev/shm")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=2m tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here (needs root or user namespaces): {probe.stderr.strip()}")
    env = sidecar_env(new_namespace(), SHM_EMBED_SYNTHETIC_US="0")
    cmd = f"mount -t tmpfs -o size=2m tmpfs /dev/shm && exec {sys.executable} -m sidecar"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the sidecar kept running on a /dev/shm too small for it:\n{out}")
    assert proc.returncode == 1, out
    assert "bytes free" in out and "needs" in out, out


HOSTILE_RING = r"""
import sys, time
import numpy as np
from shm_protocol import EmbeddingClient
from shm_protocol.layout import SLOT_DONE, SLOT_ERROR, SLOT_READY
c = EmbeddingClient.connect()
sess = c._get_session()
ids = np.array([101, 7592, 102], np.int32)
v = sess.slot_views
served = 0
end = time.monotonic() + float(sys.argv[1])
print("ready", flush=True)
while time.monotonic() < end:
    for s in range(sess.params.slots_per_ring):
        if int(v.state[s]) in (0, SLOT_DONE, SLOT_ERROR):
            served += int(v.state[s]) == SLOT_DONE
            n = int(sess.params.max_texts)
            v.tokens[s, : 3 * n] = np.tile(ids, n)
            v.offsets[s, : n + 1] = np.arange(0, 3 * n + 1, 3)
            v.n_texts[s] = n
            v.n_tokens[s] = 3 * n
            v.seq[s] += 1
            v.submit_ns[s] = 0  # "oldest of all"
            v.state[s] = SLOT_READY
            sess.bell.post()
    time.sleep(0.0005)
print(served, flush=True)
"""


def test_a_ring_that_forges_submit_ns_cannot_starve_the_others(synthetic_sidecar):
    sc = synthetic_sidecar(us=20_000, SHM_EMBED_SLOT_TEXTS="4", SHM_EMBED_MAX_BATCH_TEXTS="4",
                           SHM_EMBED_MAX_WAIT_US="0")
    hostile = subprocess.Popen([sys.executable, "-c", HOSTILE_RING, "6"], env=sc.env, cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert hostile.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        with client_for(sc, timeout_s=2.0) as honest:
            for i in range(5):
                want = [f"honest request {i}"]
                t0 = time.monotonic()
                assert np.allclose(honest.embed(want), synthetic_reference(honest, want), atol=1e-6)
                assert time.monotonic() - t0 < 0.5, "the honest ring waited behind the hostile one"
    finally:
        out, _ = hostile.communicate(timeout=30)
    assert int(out.split()[-1]) > 10, "the hostile ring was served too (it is only not favoured)"


def test_two_sidecars_started_at_once_leave_exactly_one_serving(tmp_path):
    for trial in range(4):
        ns = new_namespace()
        env = sidecar_env(ns, SHM_EMBED_SYNTHETIC_US="0")
        procs = [subprocess.Popen([sys.executable, "-m", "sidecar"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            from shm_protocol.segments import Names
            from tests.helpers import wait_ready

            wait_ready(Names(ns), None, timeout=60)
            time.sleep(1.0)  # the loser has had time to do its worst
            alive = [p for p in procs if p.poll() is None]
            assert len(alive) == 1, f"trial {trial}: {len(alive)} sidecars alive"
            loser = next(p for p in procs if p.poll() is not None)
            assert loser.returncode == 1 and "already serves" in loser.stderr.read()
            with EmbeddingClient.connect(Settings.from_env({}, namespace=ns)) as c:
                want = ["the survivor serves"]
                assert np.allclose(c.embed(want), synthetic_reference(c, want), atol=1e-6)
            alive[0].send_signal(signal.SIGTERM)
            assert alive[0].wait(30) == 0
            assert Names(ns).dev_shm_entries() == []
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


@pytest.mark.slow  # 42-67 s on 2 cores
def test_clients_of_one_process_attaching_at_once_never_share_a_ring(synthetic_sidecar):
    sc = synthetic_sidecar(us=0)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up within a few rounds
    try:
        for _ in range(10):
            with ThreadPoolExecutor(8) as pool:
                clients = list(pool.map(lambda _: EmbeddingClient.connect(sc.settings), range(8)))
            rings = [c.info()["ring"] for c in clients]
            assert len(set(rings)) == len(rings), f"two clients leased one ring: {sorted(rings)}"
            assert len(leased_rings(sc.names)) == len(clients)
            for c in clients:
                c.close()
    finally:
        sys.setswitchinterval(switch)
    assert leased_rings(sc.names) == []


def test_an_unknown_state_value_reads_as_unavailable_everywhere(synthetic_sidecar, tmp_path):
    from falcon import testing

    from web.app import create_app

    sc = synthetic_sidecar(us=0)
    client = client_for(sc)
    app = testing.TestClient(create_app(client, sc.settings.replace(data_dir=str(tmp_path / "data"))))
    assert app.simulate_get("/ready").status_code == 200
    region = Region.attach(sc.names, with_data=False)
    try:
        region.header["state"] = 77
        with pytest.raises(SidecarUnavailable, match="unknown"):
            client.embed(["x"])
        r = app.simulate_get("/ready")
        assert r.status_code == 503 and r.json["error"], r.text
        assert app.simulate_post("/embed", json={"inputs": ["x"]}).status_code == 503
        stats = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli", "--json"], env=sc.env, cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert stats.returncode == 1 and "Traceback" not in stats.stderr, stats.stderr
        assert json.loads(stats.stdout)["state"] == "unknown"
        human = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli"], env=sc.env, cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert human.returncode == 1 and "unknown" in human.stdout + human.stderr and "Traceback" not in human.stderr
    finally:
        region.header["state"] = SidecarState.READY
        region.close()
    want = ["serving again"]
    assert np.allclose(client.embed(want), synthetic_reference(client, want), atol=1e-6)
    client.close()


def test_make_run_restarts_a_sidecar_that_exits(tmp_path):
    """`make run` supervises the sidecar as systemd would: one that dies (a
    crash, or one that gave up on a wedged loop) is started again, and the
    web service serves through the new one without a restart of its own."""
    import urllib.request

    from tests.helpers import free_port

    port = free_port()
    ns = new_namespace()
    env = sidecar_env(ns, SHM_EMBED_SYNTHETIC_US="0", SHM_EMBED_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="1",
                      SHM_EMBED_DATA_DIR=str(tmp_path / "data"))
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "scripts/run.py"], env=env, cwd=REPO, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)

    def embed(text: str):
        req = urllib.request.Request(base + "/embed", data=json.dumps({"inputs": [text]}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as response:
            return np.asarray(json.loads(response.read()), np.float32)

    def serving() -> bool:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def sidecar_pid() -> int:
        region = Region.attach(Names(ns), readonly=True, with_data=False)
        try:
            return region.sidecar_pid
        finally:
            region.close()

    from shm_protocol.segments import Names

    try:
        assert _wait_for(serving, 120, 0.2), log.read_text()
        with EmbeddingClient.connect(Settings.from_env({}, namespace=ns)) as c:
            ref = synthetic_reference(c, ["through make run"])
        assert np.allclose(embed("through make run"), ref, atol=1e-6)
        first = sidecar_pid()
        os.kill(first, signal.SIGKILL)
        assert _wait_for(lambda: serving() and sidecar_pid() != first, 60, 0.2), log.read_text()
        assert np.allclose(embed("through make run"), ref, atol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert Names(ns).dev_shm_entries() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_client_dropped_without_close_hands_its_ring_back(synthetic_sidecar):
    import gc

    sc = synthetic_sidecar(us=0)
    c = client_for(sc)
    assert c.embed(["x"]).shape == (1, 384)
    assert len(leased_rings(sc.names)) == 1
    del c
    gc.collect()
    assert leased_rings(sc.names) == [], "leased rings must never outlive the clients that hold them"


def test_a_doorbell_at_its_maximum_loses_no_request_and_no_slot(synthetic_sidecar):
    """Posting to a doorbell pushed to SEM_VALUE_MAX fails (EOVERFLOW): the
    request still gets its answer (the sidecar scans slot states anyway) and
    the slot comes back to the ring, until the sidecar replaces the doorbell."""
    sc = synthetic_sidecar(us=0)
    client = client_for(sc)
    sess = client._get_session()
    for i in range(12):
        _set_semaphore_value(sc.names.bell, SEM_VALUE_MAX)
        want = [f"full doorbell {i}"]
        assert np.allclose(client.embed(want), synthetic_reference(client, want), atol=1e-6)
    assert len(sess._free) == sess.params.slots_per_ring and not sess._quarantine
    client.close()


def test_a_tokenizer_the_worker_cannot_read_leases_no_ring(synthetic_sidecar, tmp_path):
    from shm_protocol.model_files import bundled_model_path

    model = tmp_path / "model"
    shutil.copytree(bundled_model_path(), model)
    sc = synthetic_sidecar(us=0, SHM_EMBED_MODEL=str(model))
    (model / "tokenizer.json").unlink()  # the workers' view differs from the sidecar's
    for _ in range(3):
        with pytest.raises(SidecarUnavailable, match="tokenizer"):
            EmbeddingClient.connect(sc.settings)
    assert leased_rings(sc.names) == []


def test_a_request_given_up_on_is_not_computed(synthetic_sidecar):
    """A request that times out while it waits behind a long batch is
    cancelled: the sidecar answers it without model time, so the backlog a
    stall or a slow batch leaves is only work someone still waits for."""
    sc = synthetic_sidecar(us=600_000, SHM_EMBED_SLOT_TEXTS="2")
    busy, quick = client_for(sc), client_for(sc, timeout_s=0.15)
    thread = threading.Thread(target=busy.embed, args=(["a long model call"],))
    thread.start()
    time.sleep(0.1)  # the long call is in the model now
    with pytest.raises(SidecarUnavailable):  # SidecarTimeout
        quick.embed(["given", "up", "on", "in", "three slots"])  # 2 + 2 + 1 texts: every part is cancelled
    thread.join(10)
    assert _wait_for(lambda: busy.stats().errors["cancelled"] == 3, 3), busy.stats().errors
    assert busy.stats().counters["batches"] == 1, "the cancelled request ran the model"
    want = ["after the cancel"]
    assert np.allclose(busy.embed(want), synthetic_reference(busy, want), atol=1e-6)
    busy.close()
    quick.close()
