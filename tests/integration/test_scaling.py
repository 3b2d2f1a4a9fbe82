"""Gunicorn workers that follow the load: a real master, workers and a
sidecar of the synthetic backend; short thresholds through the environment."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from tests.helpers import leased_rings, start_web

SCALING = {"WEB_MIN_WORKERS": "1", "WEB_MAX_WORKERS": "3", "WEB_THREADS": "2", "WEB_SCALE_UP_AFTER_S": "0.5",
           "WEB_SCALE_DOWN_AFTER_S": "2"}


@pytest.fixture(scope="module")
def slow_sidecar(tmp_path_factory):
    """Model calls of 50 ms: each request keeps a worker's thread busy."""
    from tests.helpers import start_sidecar, stop_and_check

    sc = start_sidecar(tmp_path_factory.mktemp("sc"), None, SHM_EMBED_SYNTHETIC_US="50000", SHM_EMBED_RINGS="3",
                       SHM_EMBED_WAIT_POLICY="park")
    yield sc
    stop_and_check(sc)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


class Load:
    """``threads`` clients posting /embed, each request on a new connection
    (a kept-alive one stays with the worker that accepted it, so new workers
    would get none of it), with ``pause`` seconds between two."""

    def __init__(self, base: str, threads: int, pause: float = 0.0):
        self.codes: list[int | str] = []
        self.stop = threading.Event()
        self.http = httpx.Client(base_url=base, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        self.pause = pause
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                self.codes.append(self.http.post("/embed", json={"inputs": f"load {i} {n}"}).status_code)
            except httpx.HTTPError as exc:
                self.codes.append(type(exc).__name__)
            n += 1
            self.stop.wait(self.pause)

    def close(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.http.close()
        return self.codes


def test_workers_follow_a_load_ramp_and_a_quiet_period(slow_sidecar, tmp_path):
    from shm_protocol.processes import child_pids

    w = start_web(tmp_path, slow_sidecar.env, workers=1, **SCALING)
    loads = []
    try:
        assert len(child_pids(w.proc.pid)) == 1
        loads.append(Load(w.base, threads=8))
        wait_for(lambda: len(child_pids(w.proc.pid)) == 3, 12, "3 workers under load")
        ramp = loads[-1].close()
        # The scaler runs in the master's own loop: still one thread, no segment left mapped.
        assert os.listdir(f"/proc/{w.proc.pid}/task") == [str(w.proc.pid)]
        assert "/dev/shm/" not in open(f"/proc/{w.proc.pid}/maps").read()
        # Quiet: a request now and then while workers are retired.
        loads.append(Load(w.base, threads=1, pause=0.2))
        wait_for(lambda: len(child_pids(w.proc.pid)) == 1, 12, "back to 1 worker")
        quiet = loads[-1].close()
        assert len(ramp) > 20 and len(quiet) > 5
        assert set(ramp) == {200} and set(quiet) == {200}, (ramp, quiet)
        # The retired workers' rings went back: only the remaining worker holds one.
        wait_for(lambda: leased_rings(slow_sidecar.names) == child_pids(w.proc.pid), 5,
                 "leased rings are the live worker's")
        log = w.log.read_text()
        assert "workers 1 -> 2" in log and "workers 2 -> 1" in log, log[-3000:]
    finally:
        for load in loads:
            load.close()
        w.stop()


def test_too_few_rings_for_the_most_workers_refuses_to_start(slow_sidecar, tmp_path):
    """The configured rings cover 4 workers, the live sidecar's 3 do not."""
    with pytest.raises(RuntimeError) as failed:
        start_web(tmp_path, slow_sidecar.env, workers=1, WEB_MAX_WORKERS="4", SHM_EMBED_RINGS="16")
    message = str(failed.value)
    assert "WEB_MAX_WORKERS=4 workers need 4 rings, but the sidecar serving" in message
    assert "has 3: raise SHM_EMBED_RINGS" in message and "exited with 1" in message


class FakeArbiter:
    """What the Scaler uses of Gunicorn's arbiter: its workers, their count, its log."""

    def __init__(self, pids: list[int], threads: int):
        self.WORKERS = dict.fromkeys(pids)
        self.num_workers = len(pids)
        self.cfg = type("Cfg", (), {"threads": threads})()
        self.lines: list[str] = []
        self.log = type("Log", (), {"info": self._log, "warning": self._log, "exception": self._log})()

    def _log(self, message, *args):
        self.lines.append(message % args)


def test_the_master_reads_what_a_worker_publishes_in_its_ring(slow_sidecar):
    """A client of this process stands for a worker: its meter writes into its
    ring's row, and the master's tick (on the same made-up clock) reads it."""
    from shm_protocol.client import EmbeddingClient
    from web.scaling import BusyMeter, Scaler

    now = [10**12]
    settings = slow_sidecar.settings.replace(min_workers=1, max_workers=3, scale_up_after_s=0.0,
                                             scale_down_after_s=0.0)
    arbiter = FakeArbiter([os.getpid()], threads=2)
    scaler = Scaler(arbiter, settings, clock=lambda: now[0])
    with EmbeddingClient.connect(settings) as client:
        meter = BusyMeter(client.publish_load, clock=lambda: now[0])
        scaler.tick()  # the first reading
        meter.begin()
        meter.begin()  # both threads busy for a second
        now[0] += 10**9
        scaler.tick()
        assert arbiter.num_workers == 2, arbiter.lines
        assert arbiter.lines == ["workers 1 -> 2 (threads busy: 100%)"]
        meter.end()
        meter.end()
        now[0] += 10**9
        scaler.tick()
        assert arbiter.num_workers == 1 and arbiter.lines[-1] == "workers 2 -> 1 (threads busy: 0%)"
