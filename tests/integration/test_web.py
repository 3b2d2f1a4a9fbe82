"""The web service under a real Gunicorn with real workers and a real sidecar."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import socket
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shm_protocol.processes import child_pids
from tests.helpers import cosine_rows, start_sidecar, start_web

LIMITS = dict(SHM_EMBED_MAX_INPUTS="50", SHM_EMBED_MAX_INPUT_CHARS="5000", SHM_EMBED_MAX_BODY_BYTES="200000")


@pytest.fixture(scope="module")
def web(tiny_sidecar, tmp_path_factory):
    w = start_web(tmp_path_factory.mktemp("web"), tiny_sidecar.env, workers=2, **LIMITS)
    with httpx.Client(base_url=w.base, timeout=30) as http:
        yield http, w
    assert w.stop() == 0


def post(http, path, doc, headers=None, **kw):
    return http.post(path, content=json.dumps(doc), headers={"content-type": "application/json", **(headers or {})},
                     **kw)


def assert_error(r, status, kind=None, contains=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"])
    if kind:
        assert body["error"]["type"] == kind
    if contains:
        assert contains in body["error"]["message"]


def test_health_ready_info(web, tiny_st):
    http, _ = web
    assert http.get("/health").json() == {"status": "ok"}
    r = http.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    info = http.get("/info").json()
    assert info["dimension"] == tiny_st.get_embedding_dimension()
    assert info["max_tokens"] == 256 and info["limits"]["max_inputs"] == 50
    assert info["device"] == "cpu" and info["version"]


def test_openai_embeddings_float_and_base64(web, tiny_st):
    http, _ = web
    texts = ["first text", "a second, longer text with more words", ""]
    r = post(http, "/v1/embeddings", {"input": texts, "model": http.get("/info").json()["model"]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["object"] == "list" and [d["index"] for d in doc["data"]] == [0, 1, 2]
    vecs = np.array([d["embedding"] for d in doc["data"]], dtype=np.float32)
    assert cosine_rows(vecs, tiny_st.encode(texts)).min() >= 0.99999
    tok = tiny_st.tokenizer
    expected_tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    assert doc["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}
    r64 = post(http, "/v1/embeddings", {"input": texts, "encoding_format": "base64"}).json()
    dec = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r64["data"]])
    assert np.allclose(dec, vecs, atol=1e-6)
    single = post(http, "/v1/embeddings", {"input": "first text"}).json()
    assert len(single["data"]) == 1 and np.allclose(single["data"][0]["embedding"], vecs[0], atol=1e-6)
    dim = vecs.shape[1]
    assert post(http, "/v1/embeddings", {"input": "x", "dimensions": dim}).status_code == 200


def test_embed_normalize_and_truncate(web, tiny_st):
    http, _ = web
    texts = ["alpha beta", "gamma"]
    norm = np.array(post(http, "/embed", {"inputs": texts}).json())
    assert np.allclose(np.linalg.norm(norm, axis=1), 1, atol=1e-5)
    raw = np.array(post(http, "/embed", {"inputs": texts, "normalize": False}).json())
    assert np.allclose(raw, tiny_st.encode(texts), atol=1e-5)
    long_text = "word " * 400
    assert post(http, "/embed", {"inputs": long_text}).status_code == 200
    assert_error(post(http, "/embed", {"inputs": [long_text], "truncate": False}), 413, contains="256")


@pytest.mark.parametrize("path,body,ctype,status,contains", [
    ("/v1/embeddings", b"{not json", "application/json", 400, "JSON"),
    ("/v1/embeddings", b"\xff\xfe", "application/json", 400, None),
    ("/v1/embeddings", json.dumps({"input": "x"}).encode(), "text/plain", 415, "application/json"),
    ("/v1/embeddings", json.dumps({"input": 5}).encode(), "application/json", 422, "input"),
    ("/v1/embeddings", json.dumps({"input": []}).encode(), "application/json", 422, "empty"),
    ("/v1/embeddings", json.dumps({"input": [1, 2, 3]}).encode(), "application/json", 422, "token arrays"),
    ("/v1/embeddings", json.dumps({"input": ["a", None]}).encode(), "application/json", 422, "input[1]"),
    ("/v1/embeddings", json.dumps({"input": "a", "encoding_format": "hex"}).encode(), "application/json", 422, None),
    ("/v1/embeddings", json.dumps({"input": "a", "dimensions": 3}).encode(), "application/json", 422, "dimensions"),
    ("/v1/embeddings", json.dumps(["a"]).encode(), "application/json", 422, "object"),
    ("/v1/embeddings", json.dumps({}).encode(), "application/json", 422, "required"),
    ("/embed", json.dumps({"inputs": "a", "normalize": "yes"}).encode(), "application/json", 422, "normalize"),
    ("/embed", json.dumps({"inputs": ["x"] * 51}).encode(), "application/json", 413, "50"),
    ("/embed", json.dumps({"inputs": "x" * 5001}).encode(), "application/json", 413, "5000"),
    ("/embed", json.dumps({"inputs": "x" * 199_000, "pad": "y" * 2000}).encode(), "application/json", 413,
     "200000"),
    ("/embed", b"[" * 120_000 + b"]" * 120_000, "application/json", 413, None),
    ("/embed", b"[" * 50_000 + b"]" * 50_000, "application/json", 400, "nested"),
])
def test_bad_requests_get_json_errors(web, path, body, ctype, status, contains):
    http, _ = web
    r = http.post(path, content=body, headers={"content-type": ctype})
    assert_error(r, status, contains=contains)


@pytest.mark.parametrize("path,ctype,status", [
    ("/embed", "application/json", 413),  # over SHM_EMBED_MAX_BODY_BYTES, refused before reading
    ("/embed", "text/plain", 415),
    ("/nope", "application/json", 404),
])
def test_refused_large_body_is_answered_and_the_connection_kept(web, path, ctype, status):
    """A body refused unread still gets its JSON error, and the same
    connection serves the next request (the body was read and dropped
    instead of the connection being reset under the answer)."""
    _, w = web
    host, port = w.base.removeprefix("http://").split(":")
    body = b"x" * (3 * 1024 * 1024)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        reader = sock.makefile("rb")
        for expect in (status, 200):
            status_line = reader.readline().decode()
            assert status_line.split()[1] == str(expect), status_line
            length = None
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            payload = json.loads(reader.read(length))
            if expect == status:
                assert payload["error"]["type"]
                sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


def test_master_holds_no_segment_no_torch_no_thread(web):
    """The master only imports the web code and loads the tokenizer before
    forking: it maps no shared-memory segment, loads no torch and runs one
    thread, while its workers have the rings mapped."""
    http, instance = web
    assert post(http, "/embed", {"inputs": "warm"}).status_code == 200
    maps = open(f"/proc/{instance.proc.pid}/maps").read()
    assert "/dev/shm/" not in maps
    assert "libtorch" not in maps
    assert os.listdir(f"/proc/{instance.proc.pid}/task") == [str(instance.proc.pid)]
    assert any("/dev/shm/" in open(f"/proc/{pid}/maps").read() for pid in child_pids(instance.proc.pid))


def test_unknown_path_and_method_are_json(web):
    http, _ = web
    assert_error(http.get("/nope"), 404)
    assert_error(http.get("/v1/embeddings"), 405)


def test_request_id_in_and_out(web):
    http, instance = web
    r = post(http, "/embed", {"inputs": "id test"}, headers={"X-Request-ID": "req-abc-123"})
    assert r.headers["X-Request-ID"] == "req-abc-123"
    generated = http.get("/health").headers["X-Request-ID"]
    assert len(generated) == 32
    assert "req-abc-123" in instance.log.read_text()


def test_stats_and_metrics_are_the_host_view(web):
    http, _ = web
    for i in range(5):
        post(http, "/embed", {"inputs": [f"metric text {i}"] * 3})
    time.sleep(0.2)  # the sidecar answers first and counts after: let the last count land
    seen = [http.get("/embedding/stats").json() for _ in range(6)]
    assert len({json.dumps({k: s[k] for k in ("counters", "errors", "epoch")}) for s in seen}) == 1
    stats = seen[0]
    assert stats["status"] == "ok" and stats["counters"]["texts"] >= 15 and stats["successful_requests"] >= 5
    assert {"p50", "p99"} <= set(stats["percentiles"]["compute_seconds"])
    assert sum(1 for r in stats["rings"] if r["owner_alive"]) >= 1
    eh = http.get("/embedding/health").json()
    assert eh["status"] == "ok" and eh["embedding_server"] == "connected"
    text = http.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["shm_embed_sidecar_up"].samples[0].value == 1
    texts_total = next(x.value for x in fams["shm_embed_texts"].samples if x.name == "shm_embed_texts_total")
    assert texts_total >= 15
    assert fams["shm_embed_compute_duration_seconds"].type == "histogram"
    assert any(x.labels.get("kind") == "bad_token" for x in fams["shm_embed_errors"].samples)


def test_api_key(tiny_sidecar, tmp_path):
    web = start_web(tmp_path, tiny_sidecar.env, workers=1, SHM_EMBED_API_KEY="s3cret")
    try:
        with httpx.Client(base_url=web.base, timeout=30) as http:
            assert http.get("/health").status_code == 200
            assert_error(post(http, "/embed", {"inputs": "x"}), 401)
            response = http.post("/embed", content=b'{"inputs": "x"}', headers={"content-type": "application/json",
                                                                        "authorization": "Bearer wrong"})
            assert_error(response, 401)
            response = http.post("/embed", content=b'{"inputs": "x"}', headers={"content-type": "application/json",
                                                                        "authorization": "Bearer s3cret"})
            assert response.status_code == 200
    finally:
        web.stop()


def test_ring_full_is_429_with_retry_after(tiny_model, tmp_path):
    sc = start_sidecar(tmp_path, str(tiny_model), SHM_EMBED_SLOTS_PER_RING="1", SHM_EMBED_SLOT_TEXTS="4",
                       SHM_EMBED_TORCH_THREADS="1")
    web = start_web(tmp_path, sc.env, workers=1, WEB_THREADS="6", SHM_EMBED_RING_WAIT_S="0.05")
    try:
        with httpx.Client(base_url=web.base, timeout=60) as http:
            body = {"inputs": ["a longer text to keep the only slot busy " * 5] * 400}
            with cf.ThreadPoolExecutor(6) as pool:
                rs = list(pool.map(lambda _: post(http, "/embed", body), range(6)))
            codes = sorted(r.status_code for r in rs)
            assert 200 in codes and 429 in codes, codes
            r429 = next(r for r in rs if r.status_code == 429)
            assert int(r429.headers["Retry-After"]) >= 1
            assert_error(r429, 429, kind="rate_limited")
            assert post(http, "/embed", {"inputs": "after"}).status_code == 200
    finally:
        web.stop()
        sc.stop()


def test_sidecar_down_is_503_then_recovers(fresh_tiny_sidecar, tmp_path):
    sc = fresh_tiny_sidecar()
    web = start_web(tmp_path, sc.env, workers=2)
    try:
        with httpx.Client(base_url=web.base, timeout=30) as http:
            assert post(http, "/embed", {"inputs": "up"}).status_code == 200
            sc.stop()
            r = post(http, "/embed", {"inputs": "down"})
            assert_error(r, 503, kind="service_unavailable")
            assert r.headers["Retry-After"] == "1"
            assert http.get("/ready").status_code == 503
            eh = http.get("/embedding/health")
            assert eh.status_code == 503 and eh.json()["status"] == "degraded"
            assert http.get("/health").status_code == 200
            fresh_tiny_sidecar(namespace=sc.settings.namespace)
            for _ in range(4):  # both workers re-attach on their next call
                assert post(http, "/embed", {"inputs": "back"}).status_code == 200
    finally:
        web.stop()
