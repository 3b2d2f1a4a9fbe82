"""The web service when processes die, reload, or the sidecar goes away."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from shm_protocol.processes import child_pids
from shm_protocol.region import Region
from tests.helpers import cosine_rows, start_web


def worker_pids(master: int) -> list[int]:
    return child_pids(master)


def post(http, doc):
    return http.post("/embed", content=json.dumps(doc), headers={"content-type": "application/json",
                                                                 "connection": "close"})


def load(base, stop, results, body):
    with httpx.Client(base_url=base, timeout=30) as http:
        while not stop.is_set():
            try:
                results.append(post(http, body).status_code)
            except httpx.TransportError as exc:
                results.append(type(exc).__name__)


def test_worker_sigkill_ring_reclaimed_and_others_unaffected(tiny_sidecar, tmp_path):
    web = start_web(tmp_path, tiny_sidecar.env, workers=2)
    try:
        stop, results = threading.Event(), []
        threads = [threading.Thread(target=load, args=(web.base, stop, results, {"inputs": ["x " * 50] * 20}))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        victim = worker_pids(web.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        after_kill = results[len(results) // 2:]
        assert all(r == 200 for r in after_kill[-20:]), after_kill[-20:]
        assert results.count(200) > 20
        region = Region.attach(tiny_sidecar.names, readonly=True, with_data=False)
        try:
            owners = [int(o) for o in region.rings["owner_pid"]]
        finally:
            region.close()
        assert victim not in owners and -1 not in owners, owners
        live = worker_pids(web.proc.pid)
        assert len(live) == 2 and victim not in live
        assert set(live) <= set(owners), (live, owners)
    finally:
        web.stop()


def test_hup_reload_loses_no_request(tiny_sidecar, tmp_path):
    web = start_web(tmp_path, tiny_sidecar.env, workers=2)
    try:
        stop, results = threading.Event(), []
        threads = [threading.Thread(target=load, args=(web.base, stop, results, {"inputs": ["reload"] * 5}))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        old = set(worker_pids(web.proc.pid))
        web.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (set(worker_pids(web.proc.pid)) & old or
                                               len(worker_pids(web.proc.pid)) < 2):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not (set(worker_pids(web.proc.pid)) & old), "workers were replaced"
        assert results and all(r == 200 for r in results), [r for r in results if r != 200][:5]
    finally:
        web.stop()


@pytest.mark.slow  # 24-30 s on 2 cores: a local model loads in each worker
def test_local_fallback_while_the_sidecar_is_down(fresh_tiny_sidecar, tiny_st, tmp_path):
    sc = fresh_tiny_sidecar()
    web = start_web(tmp_path, sc.env, workers=1, SHM_EMBED_FALLBACK="local")
    texts = ["fallback text", "another one"]
    ref = tiny_st.encode(texts)
    try:
        with httpx.Client(base_url=web.base, timeout=60) as http:
            response = post(http, {"inputs": texts, "normalize": False})
            assert response.status_code == 200 and cosine_rows(response.json(), ref).min() >= 0.99999
            assert http.get("/embedding/health").json()["mode"] == "ipc"
            sc.stop()
            response = post(http, {"inputs": texts, "normalize": False})
            assert response.status_code == 200, response.text
            assert cosine_rows(response.json(), ref).min() >= 0.99999
            eh = http.get("/embedding/health")
            assert eh.status_code == 503 and eh.json()["mode"] == "local"
            fresh_tiny_sidecar(namespace=sc.settings.namespace)
            response = post(http, {"inputs": texts, "normalize": False})
            assert response.status_code == 200 and cosine_rows(response.json(), ref).min() >= 0.99999
            assert http.get("/embedding/health").json()["mode"] == "ipc"
    finally:
        web.stop()


def test_ipc_off_embeds_locally_without_a_sidecar(tiny_model, tiny_st, tmp_path):
    from tests.helpers import new_namespace, sidecar_env

    env = sidecar_env(new_namespace(), str(tiny_model), USE_IPC_EMBEDDING="false")
    web = start_web(tmp_path, env, workers=1)
    try:
        with httpx.Client(base_url=web.base, timeout=60) as http:
            r = http.post("/v1/embeddings", content=json.dumps({"input": ["no sidecar"]}),
                          headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            got = np.array([d["embedding"] for d in r.json()["data"]])
            assert cosine_rows(got, tiny_st.encode(["no sidecar"]))[0] >= 0.99999
            assert http.get("/info").json()["mode"] == "local"
            eh = http.get("/embedding/health").json()
            assert eh["ipc_enabled"] is False and eh["mode"] == "local"
    finally:
        web.stop()
