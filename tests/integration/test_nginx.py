"""The shipped nginx configuration (deploy/nginx/shm-embed.conf) in front of
real Gunicorns and sidecars of the synthetic backend: slow clients, request
ids, the body limit, and two instances surviving the SIGKILL of a sidecar."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from shm_protocol.segments import unlink_namespace
from tests.helpers import client_for, leased_rings, start_web, synthetic_reference
from tests.nginx import make_nginx, require_nginx


@pytest.fixture(autouse=True)
def _nginx_installed():
    """Skip before any process starts where nginx is not installed."""
    require_nginx()


def hostport(base: str) -> str:
    return base.removeprefix("http://")


class SlowHeaders:
    """``n`` connections that each send a request line, then one header line
    every ``interval`` seconds, and never finish their headers."""

    def __init__(self, port: int, n: int, interval: float = 0.5):
        self.socks: list[socket.socket] = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\n")
            self.socks.append(s)
        self.interval = interval
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        i = 0
        while not self.stop.wait(self.interval):
            i += 1
            for s in self.socks:
                try:
                    s.sendall(b"X-Slow-%d: x\r\n" % i)
                    self.sent += 1
                except OSError:  # the server closed it (its header timeout)
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def get_health(port: int, timeout: float) -> tuple[int | str, float]:
    """One GET /health on a new connection: (status or error name, seconds)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        return r.status, time.monotonic() - t0
    except OSError as exc:
        return type(exc).__name__, time.monotonic() - t0
    finally:
        conn.close()


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_health_answers_through_nginx_while_64_slow_header_connections_are_open(synthetic_sidecar, tmp_path):
    sc = synthetic_sidecar(us=0)
    with contextlib.ExitStack() as stack:
        # 2 workers x 2 threads: four slow clients are enough to take every thread.
        web = start_web(tmp_path, sc.env, workers=2, WEB_THREADS=2)
        stack.callback(web.stop)
        # Both workers serve (each leased its ring before its first request):
        # a worker still starting would take /health with free threads.
        deadline = time.monotonic() + 30
        while len(leased_rings(sc.names)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(leased_rings(sc.names)) == 2, leased_rings(sc.names)
        ng = make_nginx(tmp_path, [hostport(web.base)])
        stack.callback(ng.stop)
        ng.start()

        slow = SlowHeaders(ng.port, 64)
        try:
            time.sleep(1.2)  # every slow connection is accepted and has sent header lines
            through = [get_health(ng.port, timeout=5) for _ in range(10)]
            assert slow.sent >= 64, "the slow connections did not trickle"
        finally:
            slow.close()
        assert all(status == 200 for status, _ in through), through
        assert max(t for _, t in through) < 1.0, through

        # The same attack on Gunicorn directly: each of its threads blocks on a
        # connection whose headers never end, so /health waits behind them.
        assert get_health(port_of(web.base), timeout=5)[0] == 200
        slow = SlowHeaders(port_of(web.base), 64)
        try:
            time.sleep(1.2)
            direct = get_health(port_of(web.base), timeout=2)
        finally:
            slow.close()
        assert direct[0] != 200 or direct[1] > 1.0, f"Gunicorn alone answered /health fast under the attack: {direct}"
        assert web.proc.poll() is None


def test_nginx_keeps_or_makes_request_ids_and_refuses_oversized_bodies_in_json(synthetic_sidecar, tmp_path):
    sc = synthetic_sidecar(us=0)
    with contextlib.ExitStack() as stack:
        w = start_web(tmp_path, sc.env, workers=1)
        stack.callback(w.stop)
        ng = make_nginx(tmp_path, [hostport(w.base)])
        stack.callback(ng.stop)
        ng.start()
        with httpx.Client(base_url=ng.base, timeout=10) as http:
            mine = http.get("/health", headers={"X-Request-ID": "client-chosen-42"})
            assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-chosen-42"
            made = http.get("/health")
            assert made.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
            r = http.post("/embed", json={"inputs": ["through the proxy"]})
            assert r.status_code == 200 and len(r.json()[0]) == sc.settings.synthetic_dim
        # A declared body over client_max_body_size (16 MiB, the app's
        # default SHM_EMBED_MAX_BODY_BYTES) is refused before it is read.
        with socket.create_connection(("127.0.0.1", ng.port), timeout=5) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (16 * 1024 * 1024 + 1))
            raw = b""
            while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), raw[:500]
        assert json.loads(body)["error"]["type"] == "request_too_large"
        lines = ng.access_lines()
        assert any("rid=client-chosen-42 " in line for line in lines), lines
        # The id nginx made is the one the app answered with (and logged).
        assert any(f"rid={made.headers['x-request-id']} " in line for line in lines), lines


def _load(base: str, texts: list[str], stop: threading.Event, results: list, tid: int) -> None:
    """POST /embed of one text at a time until ``stop``; each result is
    (request id, text index, sent, done, status or error, vector or None)."""
    n = 0
    with httpx.Client(base_url=base, timeout=10) as http:
        while not stop.is_set():
            i = (tid * 7 + n) % len(texts)
            rid = f"load-{tid}-{n}"
            n += 1
            t0 = time.monotonic()
            try:
                r = http.post("/embed", json={"inputs": [texts[i]]}, headers={"X-Request-ID": rid})
                vec = r.json()[0] if r.status_code == 200 else None
                results.append((rid, i, t0, time.monotonic(), r.status_code, vec))
            except (httpx.HTTPError, ValueError) as exc:
                results.append((rid, i, t0, time.monotonic(), type(exc).__name__, None))


def test_two_instances_behind_nginx_survive_a_sidecar_sigkill(synthetic_sidecar, tmp_path):
    victim, survivor = synthetic_sidecar(us=0), synthetic_sidecar(us=0)
    texts = [f"text number {i}: " + "shared memory ring " * (i % 5) for i in range(40)]
    with client_for(survivor) as client:
        reference = synthetic_reference(client, texts)
    stop, results, threads = threading.Event(), [], []

    def stop_load():
        stop.set()
        for thread in threads:
            thread.join(15)

    with contextlib.ExitStack() as stack:
        w1 = start_web(tmp_path, dict(victim.env, SHM_EMBED_DATA_DIR=str(tmp_path / "data1")), workers=2)
        stack.callback(w1.stop)
        w2 = start_web(tmp_path, dict(survivor.env, SHM_EMBED_DATA_DIR=str(tmp_path / "data2")), workers=2)
        stack.callback(w2.stop)
        ng = make_nginx(tmp_path, [hostport(w1.base), hostport(w2.base)])
        stack.callback(ng.stop)
        ng.start()
        stack.callback(stop_load)
        for tid in range(4):
            threads.append(threading.Thread(target=_load, args=(ng.base, texts, stop, results, tid)))
            threads[-1].start()
        time.sleep(1.5)
        kill_start = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        kill_done = time.monotonic()
        time.sleep(2.5)
        stop_load()
        hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"client threads still running: {hung}"

    failed = [(rid, status) for rid, _, _, _, status, _ in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:10]}"
    for rid, i, _, _, _, vec in results:
        got = np.asarray(vec, dtype=np.float64)
        assert got.shape == reference[i].shape, (rid, got.shape)
        assert np.abs(got - reference[i]).max() < 1e-5, f"{rid}: wrong vector for text {i}"
    before = [r for r in results if r[3] < kill_start]
    after = [r for r in results if r[2] > kill_done]
    assert before and after, (len(before), len(after))

    # nginx's log: every request sent after the kill was answered by the
    # survivor, and the ones that reached the victim first were retried.
    log = {}
    for line in ng.access_lines():
        m = re.search(r"rid=(\S+) upstream=(.*) upstream_status=(.*) rt=", line)
        if m:
            log[m.group(1)] = ([a.strip() for a in re.split(r"\s*[,:]\s+", m.group(2))], m.group(3))
    answered_by = {rid: (addrs[-1], statuses) for rid, (addrs, statuses) in log.items()}
    assert all(r[0] in answered_by for r in results), "requests missing from nginx's access log"
    wrong = [(r[0], answered_by[r[0]]) for r in after if answered_by[r[0]][0] != hostport(w2.base)]
    assert not wrong, f"answered after the kill by another instance than the survivor: {wrong[:5]}"
    retried = [rid for rid, (_, statuses) in answered_by.items() if statuses.startswith("503")]
    assert retried, "no request was retried after the victim's 503"

    unlink_namespace(victim.names, lock=True)
    assert victim.names.dev_shm_entries() == []
