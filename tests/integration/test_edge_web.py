"""The web service against hostile requests (issue: the edge): chunked
bodies, bodies that amplify into memory once parsed, many large bodies at
once, requests over the token budget, and error bodies that must not name
internals. Real Gunicorn workers in front of a synthetic sidecar."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time

import httpx
import numpy as np
import pytest

from shm_protocol.processes import child_pids
from tests.helpers import client_for, start_web, synthetic_reference


def worker_pids(master: int) -> list[int]:
    return child_pids(master)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture
def web(synthetic_sidecar, tmp_path):
    """A synthetic sidecar and Gunicorn (1 worker, so every request meets the same process)."""
    started = []

    def make(workers: int = 1, **extra):
        sc = synthetic_sidecar(us=0)
        w = start_web(tmp_path, sc.env, workers=workers, **extra)
        started.append(w)
        return sc, w

    yield make
    for w in started:
        w.stop()


def test_a_chunked_body_is_read_to_its_end(web):
    sc, w = web()
    texts = ["chunked transfer encoding", "a second text, sent in another chunk"]
    body = json.dumps({"inputs": texts}).encode()
    host, port = w.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        # Three chunks, split inside the JSON, and no Content-Length.
        conn.request("POST", "/embed", body=iter([body[:7], body[7:30], body[30:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        got = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200, got
    with client_for(sc) as c:
        ref = synthetic_reference(c, texts)
    assert np.allclose(np.asarray(got, np.float32), ref, atol=1e-6)


def test_a_chunked_body_over_the_limit_is_a_413(web):
    _, w = web(SHM_EMBED_MAX_BODY_BYTES=str(64 * 1024), SHM_EMBED_MAX_INFLIGHT_BODY_BYTES=str(1 << 20))
    big = json.dumps({"inputs": ["x" * 50_000, "y" * 50_000]}).encode()
    host, port = w.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/embed", body=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and doc["error"]["type"] == "request_too_large"


def test_a_body_of_tiny_json_values_is_refused_before_it_is_parsed(web):
    """16 MiB of '{}' items took a worker from 175 to 603 MiB before its 422."""
    _, instance = web()
    body = b'{"inputs": [' + b"{}," * (5 * 1024 * 1024) + b"{}]}"  # 15 MiB, 5 million objects
    assert len(body) < 16 * 1024 * 1024
    pid = worker_pids(instance.proc.pid)[0]
    before = rss_mb(pid)
    with httpx.Client(base_url=instance.base, timeout=60) as http:
        r = http.post("/embed", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert "SHM_EMBED_MAX_JSON_VALUES" in r.json()["error"]["message"]
        grown = rss_mb(pid) - before
        # The raw body (15 MiB) and its string-free copy: far from the 400+ MiB of parsing it.
        assert grown < 120, f"worker grew by {grown:.0f} MiB"
        ok = http.post("/embed", json={"inputs": ["still serving"]})
        assert ok.status_code == 200
    # Legitimate large bodies still pass: many strings with commas inside them.
    with httpx.Client(base_url=instance.base, timeout=60) as http:
        texts = ["one, two, three, four, five, six, seven " * 20 for _ in range(200)]
        assert http.post("/embed", json={"inputs": texts}).status_code == 200


def test_large_bodies_at_once_are_bounded_per_worker(web):
    """While one 1 MiB body is being read, a second is refused with 503 and
    Retry-After instead of being held in memory beside it; the first then
    completes normally."""
    _, instance = web(SHM_EMBED_MAX_BODY_BYTES=str(1 << 20), SHM_EMBED_MAX_INFLIGHT_BODY_BYTES=str(1 << 20),
                      SHM_EMBED_MAX_INPUT_CHARS="1000000", WEB_THREADS="4")
    host, port = instance.base.removeprefix("http://").split(":")
    body = json.dumps({"inputs": ["z" * 900_000]}).encode()
    slow = socket.create_connection((host, int(port)), timeout=10)
    try:
        slow.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
        time.sleep(0.5)  # the first request now holds its 1 MiB reservation, reading
        with httpx.Client(base_url=instance.base, timeout=10) as http:
            r = http.post("/embed", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after")
        slow.sendall(body[1000:])
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = slow.recv(65536)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    finally:
        slow.close()
    with httpx.Client(base_url=instance.base, timeout=10) as http:  # the budget was given back
        assert http.post("/embed", content=body, headers={"content-type": "application/json"}).status_code == 200


def test_hostile_bodies_cost_linear_time_and_no_more_than_they_say(web):
    """A string opened with '"' and then only escaped quotes made the value
    count quadratic (hours for a MiB); a UTF-16 body hid its values from the
    count; a long prompt is copied onto every input."""
    _, w = web()
    with httpx.Client(base_url=w.base, timeout=30) as http:
        t0 = time.monotonic()
        hostile = b'{"inputs": ["' + b'\\"' * (1 << 20)
        response = http.post("/embed", content=hostile, headers={"content-type": "application/json"})
        assert response.status_code == 400 and time.monotonic() - t0 < 5
        utf16 = ('{"inputs": ["\u2200", ' + "[]," * 200_000 + '"x"]}').encode("utf-16-le")
        response = http.post("/embed", content=utf16, headers={"content-type": "application/json"})
        assert response.status_code == 400  # read as UTF-8 only: not JSON there, refused before any value is built
        response = http.post("/embed", json={"inputs": ["a"] * 100, "prompt": "x" * 100_000})
        assert response.status_code == 413 and "prompt" in response.json()["error"]["message"]
        assert http.post("/embed", json={"inputs": ["still serving"]}).status_code == 200


def test_a_request_over_the_token_budget_is_a_413(web):
    _, w = web(SHM_EMBED_MAX_REQUEST_TOKENS="40")
    with httpx.Client(base_url=w.base, timeout=10) as http:
        small = http.post("/embed", json={"inputs": ["a few words"] * 3})
        assert small.status_code == 200
        for path, key in (("/embed", "inputs"), ("/v1/embeddings", "input")):
            response = http.post(path, json={key: ["several words in each of these texts"] * 8})
            assert response.status_code == 413, (path, response.text)
            assert "tokens" in response.json()["error"]["message"]
        # Truncated inputs count as what is embedded: 256 tokens each at most.
        response = http.post("/embed", json={"inputs": ["word " * 1000]})
        assert response.status_code == 413


def test_unavailable_answers_do_not_name_the_namespace_pid_or_segments(web):
    sc, instance = web()
    pid = sc.proc.pid
    ns = sc.settings.namespace
    os.kill(pid, signal.SIGKILL)
    sc.proc.wait(10)
    with httpx.Client(base_url=instance.base, timeout=10) as http:
        bodies = [http.post("/embed", json={"inputs": ["hello"]}), http.get("/ready"),
                  http.get("/embedding/health"), http.get("/embedding/stats"),
                  http.post("/v1/embeddings", json={"input": "hello"})]
    for r in bodies:
        assert r.status_code == 503, (r.request.url, r.text)
        text = r.text
        assert ns not in text and str(pid) not in text and "/dev/shm" not in text and "sem." not in text, text
        assert "sidecar" in text  # still says what is wrong, in general terms
    log = instance.log.read_text(errors="replace")
    assert str(pid) in log or ns in log  # the details are in the server's log


def test_documents_obey_the_per_text_limit_and_the_request_budget(web):
    """A 1,000,000-character document was accepted, and one request could ask
    for 84 thousand to 2 million passages."""
    _, w = web(SHM_EMBED_MAX_INPUTS="50", SHM_EMBED_MAX_REQUEST_TOKENS="3000")
    with httpx.Client(base_url=w.base, timeout=30) as http:
        assert http.put("/collections/kb").status_code == 201
        for huge in ({"id": "huge", "text": "word " * 200_000}, "word " * 200_000):  # an object, or a bare string
            response = http.post("/collections/kb/documents", json={"documents": [huge]})
            assert response.status_code == 413 and "SHM_EMBED_MAX_INPUT_CHARS" in response.json()["error"]["message"]
        # 60 passages of 100 new words each (120-word passages, 20 overlapping): over 50 inputs.
        many = " ".join(f"w{i}" for i in range(6100))
        response = http.post("/collections/kb/documents", json={"documents": [{"id": "many", "text": many}]})
        assert response.status_code == 413 and "passages" in response.json()["error"]["message"], response.text
        # 30 passages fit the count, not the 3,000-token budget (about 7,000 tokens).
        response = http.post("/collections/kb/documents",
                             json={"documents": [{"id": "toks", "text": many[:len(many) // 2]}]})
        assert response.status_code == 413 and "tokens" in response.json()["error"]["message"], response.text
        assert http.get("/collections/kb").json()["documents"] == 0  # nothing half-written
        ok = http.post("/collections/kb/documents", json={"documents": [{"id": "fine", "text": "a short one"}]})
        assert ok.status_code == 200, ok.text


def test_ready_reports_a_corrupt_store(web, tmp_path):
    _, w = web()
    with httpx.Client(base_url=w.base, timeout=30) as http:
        assert http.get("/ready").json()["store"] == "ok"
        assert http.put("/collections/kb").status_code == 201
        assert http.get("/ready").status_code == 200
        db = tmp_path / "data" / "collections.sqlite3"
        import sqlite3

        con = sqlite3.connect(db)  # move the pages out of the write-ahead log into the file first
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        with open(db, "r+b") as f:  # the header and the first pages: no longer a database
            f.write(b"\x00garbage" * 512)
        r = http.get("/ready")
        assert r.status_code == 503 and "collection store unavailable" in r.json()["error"]["message"], r.text
        assert str(db) not in r.text
