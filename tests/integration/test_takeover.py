"""Taking a namespace over: a second sidecar swaps the model under traffic
without a failed request or a wrong vector, and one that cannot load its
model leaves the serving sidecar alone (docs/takeover.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from shm_protocol.region import Region
from tests.helpers import REPO, client_for, sidecar_env, start_sidecar, stop_and_check

TEXTS = ["the first text", "a second one, longer than the first", "third", "shared memory",
         "a model swapped under traffic", "no request fails", "sixth text here", "and the last"]

# A worker process: 2 threads embed 1 or 3 texts at a time until told to
# stop, and report (start time, verdict) per request: "old" or "new" when
# every row is that model's reference vector for its text.
WORKER = r"""
import json, os, sys, threading, time
import numpy as np
from shm_protocol import EmbeddingClient
old, new = np.load(sys.argv[1]), np.load(sys.argv[2])
texts, stop_file = json.loads(sys.argv[3]), sys.argv[4]
client = EmbeddingClient.connect()
client.embed(texts[:1])
print("ready", flush=True)
results, lock = [], threading.Lock()

def verdict(got, rows):
    for name, ref in (("old", old), ("new", new)):
        if np.allclose(got, ref[rows], atol=1e-5):
            return name
    return "wrong"

def run(k):
    i = k
    while not os.path.exists(stop_file):
        i = (i + 1) % len(texts)
        rows = [i] if i % 2 else [i, (i + 1) % len(texts), (i + 2) % len(texts)]
        t0 = time.monotonic()
        try:
            seen = verdict(client.embed([texts[r] for r in rows]), rows)
        except Exception as exc:
            seen = "error: " + repr(exc)
        with lock:
            results.append((t0, seen))

threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
client.close()
print(json.dumps(results), flush=True)
"""


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """Another tiny model: same tokenizer and sizes, other weights."""
    from sidecar.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny2"), seed=1)


@pytest.fixture(scope="module")
def serving(tiny_model, tmp_path_factory):
    """A sidecar of the tiny model, shared by the module: the failed load
    leaves it serving, the swap (the module's last use of it) has it taken
    over, after which it has exited by itself. Its notify socket (as
    systemd's, which its successor shares) is ``sc.notify``."""
    folder = tmp_path_factory.mktemp("serving")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify.sock"))
    sock.settimeout(120)
    sc = start_sidecar(folder, str(tiny_model), SHM_EMBED_TORCH_THREADS="1", NOTIFY_SOCKET=str(folder / "notify.sock"))
    sc.notify = sock
    yield sc
    sock.close()
    if sc.proc.poll() is None:
        stop_and_check(sc)


def _takeover_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", "--takeover", *extra]


def test_a_takeover_that_cannot_load_its_model_leaves_the_sidecar_serving(serving, tmp_path):
    with client_for(serving) as c:
        before = c.info()
        env = sidecar_env(serving.settings.namespace, str(tmp_path / "no-such-model"))
        out = subprocess.run(_takeover_cmd(), env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert "cannot start" in out.stderr and "no-such-model" in out.stderr, out.stderr[-2000:]
        assert serving.proc.poll() is None, "the serving sidecar must not stop"
        after = c.info()
        assert (after["epoch"], after["sidecar_pid"]) == (before["epoch"], before["sidecar_pid"])
        assert c.embed(TEXTS[:2]).shape == (2, before["dimension"])
    region = Region.attach(serving.names, readonly=True, with_data=False)
    try:
        assert int(region.header["takeover_pid"]) == 0, "a successor that failed asks for nothing"
    finally:
        region.close()
    assert not any(e.endswith("-next") for e in serving.names.dev_shm_entries())


def test_a_model_is_swapped_under_traffic_without_a_failed_or_wrong_answer(serving, second_model, tiny_st,
                                                                          tmp_path):
    """2 processes x 2 threads embed while a sidecar of another model takes
    the namespace over, launched as systemd's ExecReload= does (--detach,
    with a notify socket): every answer is the old model's or the new
    model's vector for its text, none fails, and none started after the
    switch comes from the old model."""
    from sentence_transformers import SentenceTransformer

    old_ref, new_ref = tmp_path / "old.npy", tmp_path / "new.npy"
    np.save(old_ref, tiny_st.encode(TEXTS, convert_to_numpy=True))
    np.save(new_ref, SentenceTransformer(str(second_model), device="cpu").encode(TEXTS, convert_to_numpy=True))
    assert not np.allclose(np.load(old_ref), np.load(new_ref), atol=1e-3), "the two models must differ"
    stop_file = tmp_path / "stop"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(old_ref), str(new_ref), json.dumps(TEXTS),
                                 str(stop_file)], env=serving.env, cwd=REPO, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    successor = 0
    try:
        successor = _swap(serving, second_model, workers, stop_file, tmp_path)
    finally:
        _stop_successor(serving, successor)
    assert serving.names.dev_shm_entries() == [], "the successor removes the namespace when it stops"


def _swap(serving, second_model, workers, stop_file, tmp_path) -> int:
    """Take ``serving`` over under the workers' traffic; check their answers. Returns the successor's pid."""
    sock = serving.notify
    successor = 0
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready"
        env = sidecar_env(serving.settings.namespace, str(second_model), SHM_EMBED_TORCH_THREADS="1",
                          NOTIFY_SOCKET=serving.env["NOTIFY_SOCKET"])
        log = tmp_path / "successor.log"
        launcher = subprocess.run(_takeover_cmd("--detach"), env=env, cwd=REPO, stdout=log.open("wb"),
                                  stderr=subprocess.STDOUT, timeout=120)
        assert launcher.returncode == 0, log.read_text()
        message = ""
        while not message.startswith("MAINPID="):  # past the old sidecar's own READY=1
            message = sock.recv(4096).decode()
        successor = int(message.split("=")[1])
        assert serving.proc.wait(30) == 0, "the old sidecar exits cleanly once it has handed over"
        switched = time.monotonic()
        sock.settimeout(0.2)
        later = []
        try:
            while True:
                later.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "READY=1" in later, later
        assert "STOPPING=1" not in later, "the old sidecar must not tell systemd the unit stops"
        region = Region.attach(serving.names, readonly=True, with_data=False)
        assert region.sidecar_pid == successor and region.state_name == "ready"
        region.close()
        time.sleep(0.7)  # traffic on the new sidecar
    finally:
        stop_file.touch()
        results = []
        for w in workers:
            out, _ = w.communicate(timeout=60)
            results += json.loads(out.strip().splitlines()[-1])
    failed = [v for _, v in results if v not in ("old", "new")]
    assert not failed, failed[:5]
    verdicts = [v for _, v in results]
    assert verdicts.count("old") > 0 and verdicts.count("new") > 0, (verdicts.count("old"), len(verdicts))
    late_old = [t for t, v in results if v == "old" and t > switched]
    assert not late_old, f"{len(late_old)} requests started after the switch got the old model's vectors"
    assert all(w.returncode == 0 for w in workers)
    return successor


def _stop_successor(serving, successor: int) -> None:
    """Stop the successor (found in the header when the test failed before
    it learnt its pid) and wait for it to remove the namespace."""
    from shm_protocol.errors import ShmEmbedError

    if not successor:
        try:
            region = Region.attach(serving.names, readonly=True, with_data=False)
        except ShmEmbedError:
            return
        successor = region.sidecar_pid if region.sidecar_pid != serving.proc.pid else 0
        region.close()
    if successor:
        os.kill(successor, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while serving.names.dev_shm_entries() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_takeover_request_written_by_a_worker_is_ignored(synthetic_sidecar):
    """A pid written into takeover_pid by a process that holds no takeover
    lock (any worker may write the header) is cleared; the sidecar serves on."""
    from tests.helpers import synthetic_reference

    sc = synthetic_sidecar(us=0)
    with client_for(sc) as c:
        epoch = c.info()["epoch"]
        region = Region.attach(sc.names, with_data=False)
        try:
            region.hv.takeover_pid[0] = os.getpid()  # alive, but no successor
            deadline = time.monotonic() + 5
            while int(region.hv.takeover_pid[0]) and time.monotonic() < deadline:
                c.embed(["wake the loop"])
                time.sleep(0.01)
            assert int(region.hv.takeover_pid[0]) == 0 and region.state_name == "ready"
        finally:
            region.close()
        want = ["still served"]
        assert np.allclose(c.embed(want), synthetic_reference(c, want), atol=1e-6)
        assert c.info()["epoch"] == epoch and sc.proc.poll() is None


def test_a_dead_successors_takeover_lock_is_removed_and_a_new_takeover_can_start(synthetic_sidecar):
    """A successor killed after it took ``/NS-next`` leaves the segment
    behind (its lock dies with it): the sidecar removes it when it clears
    the request, so nothing stays in /dev/shm and the next successor locks
    a fresh one."""
    from shm_protocol.segments import NamespaceLock

    sc = synthetic_sidecar(us=0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "from shm_protocol.segments import Names, NamespaceLock\n"
         f"NamespaceLock(Names({sc.settings.namespace!r}), mode=0o600, takeover=True)\n"
         "print('locked', flush=True); time.sleep(60)"],
        env=sc.env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        region = Region.attach(sc.names, with_data=False)
        try:
            region.hv.takeover_pid[0] = holder.pid  # it asked, then died before the sidecar looked
            holder.kill()
            holder.wait(10)
            with client_for(sc) as c:
                deadline = time.monotonic() + 5
                while int(region.hv.takeover_pid[0]) and time.monotonic() < deadline:
                    c.embed(["wake the loop"])
                    time.sleep(0.01)
                assert int(region.hv.takeover_pid[0]) == 0 and region.state_name == "ready"
                assert not any(e.endswith("-next") for e in sc.names.dev_shm_entries()), sc.names.dev_shm_entries()
                lock = NamespaceLock(sc.names, mode=0o600, takeover=True)  # the next successor is not kept out
                lock.release()
                assert c.embed(["still served"]).shape[0] == 1
        finally:
            region.close()
    finally:
        holder.kill()
        holder.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_successor_stopped_while_the_old_sidecar_drains_withdraws_and_the_old_one_serves_on(synthetic_sidecar,
                                                                                             sig):
    """SIGTERM (or Ctrl-C) to a successor before the handover withdraws its
    request: it exits 1 at once with the reason instead of taking the
    namespace over only to stop and leave it unserved. Stopped or killed,
    the old sidecar, draining for it, answers what it holds and serves on,
    and no worker's request fails meanwhile."""
    import threading

    # each model call takes 0.6 s for one text: with three callers, slots wait whenever the successor asks,
    # so the drain outlasts the SIGTERM
    sc = synthetic_sidecar(us=600_000, SHM_EMBED_CALL_ROWS="1")
    answers: list = []
    done = threading.Event()

    def keep_busy() -> None:
        while not done.is_set():
            try:
                answers.append(c.embed(["a long batch in flight"]).shape)
            except Exception as exc:  # noqa: BLE001 - recorded, and the test asserts there is none
                answers.append(exc)

    with client_for(sc) as c:
        busy = [threading.Thread(target=keep_busy) for _ in range(3)]
        successor = subprocess.Popen(_takeover_cmd(), env=sc.env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        try:
            region = Region.attach(sc.names, readonly=True, with_data=False)
            try:
                for thread in busy:
                    thread.start()
                deadline = time.monotonic() + 60
                while region.state_name == "ready" and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert region.state_name == "draining", region.state_name
                successor.send_signal(sig)
                out, _ = successor.communicate(timeout=10)
                if sig == signal.SIGTERM:
                    assert successor.returncode == 1, out[-2000:]
                    assert "stopped before sidecar pid" in out, out[-2000:]
                deadline = time.monotonic() + 10
                while region.state_name == "draining" and time.monotonic() < deadline:
                    time.sleep(0.01)
                done.set()
                for thread in busy:
                    thread.join(10)
                assert answers and all(shape == (1, c.dimension) for shape in answers), answers
                assert sc.proc.poll() is None, "the old sidecar serves on"
                assert region.state_name == "ready" and int(region.header["takeover_pid"]) == 0
                assert region.sidecar_pid == sc.proc.pid
            finally:
                region.close()
            assert c.embed(["served after"]).shape[0] == 1
            assert not any(e.endswith("-next") for e in sc.names.dev_shm_entries())
        finally:
            done.set()
            if successor.poll() is None:
                successor.kill()
                successor.wait(10)


def test_a_successor_killed_after_the_handover_leaves_the_old_sidecar_serving_again(tiny_model, tiny_st, tmp_path):
    """The successor dies (SIGKILL) as soon as the old sidecar has handed
    over, before it serves: the old one, its model still loaded, creates the
    namespace again under a new epoch and serves it; a client reattaches and
    gets the model's vectors, and /dev/shm holds the live objects alone."""
    sc = start_sidecar(tmp_path, str(tiny_model), SHM_EMBED_TORCH_THREADS="1")
    successor = None
    try:
        before = sorted(sc.names.dev_shm_entries())
        with client_for(sc) as c:
            epoch = c.info()["epoch"]
            region = Region.attach(sc.names, readonly=True, with_data=False)
            try:
                # the synthetic backend: it starts at once, and it dies before it serves
                env = sidecar_env(sc.settings.namespace, None, SHM_EMBED_SYNTHETIC_US="0")
                log = tmp_path / "successor.log"
                successor = subprocess.Popen(_takeover_cmd(), env=env, cwd=REPO, stdout=log.open("wb"),
                                             stderr=subprocess.STDOUT)
                # Stopped once it has asked to take over (it holds its lock, so
                # the old sidecar accepts and hands over), it cannot serve before
                # it is killed: no race with its start, however loaded the machine.
                deadline = time.monotonic() + 60
                while (int(region.header["takeover_pid"]) != successor.pid and successor.poll() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.001)
                successor.send_signal(signal.SIGSTOP)
                ctl = next(e for e in before if e.endswith("-ctl"))
                while (region.state_name != "handed_over" and ctl in sc.names.dev_shm_entries()
                       and successor.poll() is None and time.monotonic() < deadline):
                    time.sleep(0.001)
                successor.kill()
                successor.wait(10)
                assert region.state_name == "handed_over", (region.state_name, log.read_text()[-2000:])
            finally:
                region.close()
            from shm_protocol.region import wait_until_ready

            assert wait_until_ready(sc.names, sc.proc.pid, 30, alive=lambda: sc.proc.poll() is None), \
                sc.log_text()[-3000:]
            got = c.embed(TEXTS)  # reattaches to the new epoch
            assert c.info()["epoch"] != epoch and c.info()["sidecar_pid"] == sc.proc.pid
            assert np.allclose(got, tiny_st.encode(TEXTS, convert_to_numpy=True), atol=1e-5)
        assert f"successor sidecar pid {successor.pid} died before it served" in sc.log_text()
        assert sorted(sc.names.dev_shm_entries()) == before
    finally:
        if successor is not None and successor.poll() is None:
            successor.kill()
            successor.wait(10)
        stop_and_check(sc)
