"""Collections in PostgreSQL, shared by two shm-embed instances (two
namespaces, two ports, as two hosts behind a load balancer would be), against
the session's real cluster (tests/postgres.py): a write through one is found
through the other, writers on both lose nothing, and a server restarted under
load gives 503s, then service again, with nothing lost. Also at the store's
level: the schema's versions and migrations, and a server that cannot be
reached, without the URL's password ever showing.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest
from loguru import logger

from retrieval.collections.factory import store_status
from retrieval.collections.postgres_db import NEWER, SCHEMA_TABLE, SCHEMA_VERSION, UNREACHABLE
from retrieval.collections.store import CollectionStore
from retrieval.errors import StorageUnavailable
from shm_protocol.errors import ConfigError
from tests.helpers import (
    FixedVectorClient,
    SidecarProc,
    WebProc,
    free_port,
    start_sidecar,
    start_web,
    stop_and_check,
)

#: A password in the instances' URL: the cluster trusts loopback and ignores it, the tests look for it.
PASSWORD = "pw-never-shown-7f3a"
#: How long an instance's request waits for a connection before its 503.
TIMEOUT_S = 2


def with_password(url: str, password: str = PASSWORD) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


@dataclass
class Instance:
    sc: SidecarProc
    web: WebProc
    http: httpx.Client

    def search(self, name: str, query: str, top_k: int = 10, **extra) -> httpx.Response:
        return self.http.post(f"/collections/{name}/search", json={"query": query, "top_k": top_k, **extra})

    def write(self, name: str, docs: list) -> httpx.Response:
        return self.http.post(f"/collections/{name}/documents", json={"documents": docs})


@pytest.fixture(scope="module")
def url(pg_cluster) -> str:
    return with_password(pg_cluster.create_database("shared"))


@pytest.fixture(scope="module")
def two(tmp_path_factory, url):
    """Two instances, each a synthetic sidecar and two Gunicorn workers, over one PostgreSQL database."""
    out = []
    try:
        for tag in ("a", "b"):
            tmp = tmp_path_factory.mktemp(f"pg-{tag}")
            sc = start_sidecar(tmp, None, SHM_EMBED_SYNTHETIC_US="0")
            try:
                web = start_web(tmp, sc.env, workers=2, SHM_EMBED_COLLECTIONS_URL=url,
                                SHM_EMBED_COLLECTIONS_TIMEOUT_S=str(TIMEOUT_S))
            except BaseException:
                stop_and_check(sc)
                raise
            out.append(Instance(sc, web, httpx.Client(base_url=web.base, timeout=60)))
        yield out
    finally:
        for inst in out:
            inst.http.close()
            assert inst.web.stop() == 0
            stop_and_check(inst.sc)
        for inst in out:
            log = inst.web.log.read_text(errors="replace")
            assert PASSWORD not in log, "the database URL's password was logged"


def test_a_document_written_through_one_instance_is_found_through_the_other(two):
    first, second = two
    for inst in two:
        written = inst.http.get("/ready")
        assert written.status_code == 200 and written.json()["store"] == "ok", written.text
    assert first.http.put("/collections/shared").status_code == 201
    assert second.http.put("/collections/shared").status_code == 200  # made through the other instance
    written = first.write("shared", [{"id": "giraffe", "text": "Giraffes have long necks.", "metadata": {"via": "a"}},
                                     {"id": "whale", "text": "Whales sing long songs.", "metadata": {"via": "a"}}])
    assert written.status_code == 200, written.text
    t0 = time.monotonic()
    found = 0
    while found < 6:  # several searches in a row, whichever of B's workers answers
        hits = second.search("shared", "Giraffes have long necks.", 1).json()["results"]
        found = found + 1 if hits and hits[0]["id"] == "giraffe" else 0
        assert found or time.monotonic() - t0 < 1.0, "a write through A was not found through B within a second"
    assert hits[0]["metadata"] == {"via": "a"} and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert second.http.get("/collections/shared/documents/giraffe").json()["text"] == "Giraffes have long necks."
    # and the other way round: deleted through B, gone through A
    assert second.http.delete("/collections/shared/documents/giraffe").status_code == 200
    for _ in range(6):
        assert [h["id"] for h in first.search("shared", "Giraffes have long necks.", 5).json()["results"]] == ["whale"]
    assert first.http.get("/collections/shared/documents/giraffe").status_code == 404
    assert [c["name"] for c in second.http.get("/collections").json()["collections"]] == ["shared"]
    assert second.http.delete("/collections/shared").status_code == 200
    assert first.http.get("/collections/shared").status_code == 404
    assert first.search("shared", "x").status_code == 404


def test_four_writers_on_two_instances_lose_nothing(two):
    """Two writers per instance, while readers search through both (so every
    worker replays the change log between other writers' commits); then every
    document is found through every worker of both instances."""
    first, b = two
    assert first.http.put("/collections/busy").status_code == 201
    batches, per_batch = 12, 8
    done = threading.Event()

    def write(k: int) -> list[str]:
        inst, ids = two[k % 2], []
        for n in range(batches):
            docs = [{"id": f"w{k}-{n}-{i}", "text": f"writer {k} batch {n} item {i}", "metadata": {"writer": k}}
                    for i in range(per_batch)]
            docs.append({"id": "shared", "text": f"the shared document, last written by {k} in batch {n}"})
            write_response = inst.write("busy", docs)
            assert write_response.status_code == 200, write_response.text
            ids += [d["id"] for d in docs[:-1]]
        return ids

    def read(inst: Instance) -> int:
        n = 0
        while not done.is_set():
            assert inst.search("busy", "writer batch item", 5).status_code == 200
            n += 1
        return n

    with cf.ThreadPoolExecutor(6) as pool:
        readers = [pool.submit(read, inst) for inst in two]
        writers = [pool.submit(write, k) for k in range(4)]
        written = {i for w in writers for i in w.result()}
        done.set()
        assert all(r.result() > 0 for r in readers)
    want = written | {"shared"}
    assert len(want) == 4 * batches * per_batch + 1
    for inst in two:
        assert inst.http.get("/collections/busy").json()["documents"] == len(want)
        for _ in range(8):  # whichever worker answers: its index holds every passage
            res = inst.search("busy", "writer batch item", 1000).json()["results"]
            assert {r["id"] for r in res} == want
        for k in range(4):
            res = inst.search("busy", "writer", 1000, filter={"writer": k}).json()["results"]
            assert len(res) == batches * per_batch and {r["metadata"]["writer"] for r in res} == {k}
    assert "last written by" in first.http.get("/collections/busy/documents/shared").json()["text"]


def _error_message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def test_postgres_restarted_under_load_gives_503s_then_service_again(two, pg_cluster, url):
    """Writers and searchers on both instances while the server stops (fast:
    sessions ended, open transactions rolled back) for longer than a request
    waits for a connection, then starts again. Every answer is a 200 or a 503
    with Retry-After and a short reason; service comes back by itself; every
    write that was answered 200 is there afterwards, whole."""
    first, second = two
    assert first.http.put("/collections/load").status_code == 201
    stop = threading.Event()
    answers: list[tuple[str, str, int, str, str | None, float]] = []  # (what, id, status, body, Retry-After, at)

    def load(inst: Instance, tag: str) -> None:
        n = 0
        while not stop.is_set():
            doc_id = f"{tag}-{n}"
            n += 1
            result = inst.write("load", [{"id": doc_id, "text": f"load document {tag} {n} " + "words " * 30}])
            answers.append(("write", doc_id, result.status_code, result.text, result.headers.get("Retry-After"),
                            time.monotonic()))
            result = inst.search("load", f"load document {tag}", 3)
            answers.append(("search", tag, result.status_code, result.text, result.headers.get("Retry-After"),
                            time.monotonic()))

    threads = [threading.Thread(target=load, args=(inst, f"{tag}{k}")) for inst, tag in ((first, "a"), (second, "b"))
               for k in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        pg_cluster.stop("fast")
        down_at = time.monotonic()
        ready = [inst.http.get("/ready") for inst in two]
        time.sleep(TIMEOUT_S + 1.5)
        pg_cluster.start()
        up_at = time.monotonic()
        # back by itself: every instance writes again within a few seconds
        deadline = up_at + 15
        while time.monotonic() < deadline:
            recent = [x for x in answers if x[0] == "write" and x[5] > up_at and x[2] == 200]
            if {x[1][0] for x in recent} == {"a", "b"} and len(recent) >= 8:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        if not pg_cluster.running():
            pg_cluster.start()
    statuses = {x[2] for x in answers}
    assert statuses <= {200, 503}, {x[2]: x[3] for x in answers if x[2] not in (200, 503)}
    unavailable = [x for x in answers if x[2] == 503]
    assert unavailable, "no request failed while the server was down"
    assert all(down_at - 1 <= x[5] <= up_at + 10 for x in unavailable)
    port = str(urlsplit(url).port)
    for what, _, _, body, retry, _ in unavailable:
        assert retry is not None and retry.isdigit(), (what, body)
        assert "collection store unavailable: the database server" in body, body
        assert PASSWORD not in body and "postgresql://" not in body and port not in body, body
    for result in ready:
        assert result.status_code == 503 and result.headers["Retry-After"].isdigit(), result.text
        assert _error_message(result).startswith("not ready: collection store unavailable: the database server")
    recovered = [x for x in answers if x[5] > up_at and x[2] == 200]
    assert {x[0] for x in recovered} == {"write", "search"}, "service did not come back"
    # nothing lost: every acknowledged write is there, whole, through both instances
    acknowledged = [x[1] for x in answers if x[0] == "write" and x[2] == 200]
    assert len(acknowledged) > 20
    for i, doc_id in enumerate(acknowledged):
        result = two[i % 2].http.get(f"/collections/load/documents/{doc_id}")
        assert result.status_code == 200 and result.json()["passages"] == 1, (doc_id, result.text)
    for inst in two:
        assert inst.http.get("/ready").status_code == 200
        hits = inst.search("load", f"load document {acknowledged[-1].split('-')[0]}", 1).json()["results"]
        assert hits, "a search after the restart found nothing"


# --- the store itself -----------------------------------------------------------------------------------

def test_the_schema_is_versioned_and_migrated_once_by_concurrent_openers(pg_url):
    import psycopg

    with cf.ThreadPoolExecutor(6) as pool:  # six workers starting at once on a new database
        stores = list(pool.map(lambda _: CollectionStore(pg_url, FixedVectorClient()), range(6)))
    stores[0].create("kb")
    assert [s.list()[0]["name"] for s in stores] == ["kb"] * 6
    for s in stores:
        s.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        versions = conn.execute(f"SELECT version FROM {SCHEMA_TABLE} ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # each migration once
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"collections", "documents", "passages", "centroids", "changes", "snapshot_marks",
                          "change_floor", SCHEMA_TABLE}
        # a newer version of the service migrated this database: this one must not touch it
        conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageUnavailable) as caught:
        CollectionStore(pg_url, FixedVectorClient())
    assert caught.value.reason == NEWER[0]
    assert store_status(pg_url) == (False, f"collection store unavailable: {NEWER[0]}")


def test_an_unreachable_server_is_unavailable_and_its_password_never_shows(tmp_path):
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message}")
    try:
        down = f"postgresql://someone:{PASSWORD}@127.0.0.1:{free_port()}/db"
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            CollectionStore(down, FixedVectorClient(), timeout_s=1)
        assert time.monotonic() - t0 < 10
        assert caught.value.reason == UNREACHABLE[0]
        ok, reason = store_status(down)
        assert not ok and reason == f"collection store unavailable: {UNREACHABLE[0]}"
        with pytest.raises(ConfigError) as bad:  # libpq quotes what it cannot parse: not the password
            CollectionStore(f"postgresql://someone:{PASSWORD}%ZZ@127.0.0.1:1/db", FixedVectorClient())
    finally:
        logger.remove(sink)
    for text in (str(caught.value), caught.value.reason, reason, str(bad.value), *lines):
        assert PASSWORD not in text, text
    assert any("someone:***@127.0.0.1" in line for line in lines), lines


def _server_processes(cluster) -> list[int]:
    """The postmaster and every process it started (its backends, its helpers)."""
    import os

    pm = int((cluster.data / "postmaster.pid").read_text().split()[0])
    kids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pm:
            kids.append(int(pid))
    return [pm, *kids]


def test_a_frozen_server_fails_a_request_in_bounded_time_and_service_resumes(pg_cluster, pg_url):
    """Every process of the server stopped (SIGSTOP: its kernel still accepts and acknowledges,
    as a frozen VM's or a partitioned host's may for a while): a search with a 2 s timeout
    is a typed 503 within a bounded time, not a request that waits for ever; once the server
    goes on, so does the service."""
    import os
    import signal

    from retrieval.collections.documents import Document
    from tests.snapshot_worker import VectorClient

    store = CollectionStore(with_password(pg_url), VectorClient(8), timeout_s=TIMEOUT_S, busy_timeout_s=TIMEOUT_S)
    vectors = np.eye(8, dtype=np.float32)
    frozen: list[int] = []
    try:
        store.create("c", {"index": "flat"})
        store.write_embedded("c", [Document(f"d{i}", "x", None, {}, [(0, 1)]) for i in range(8)], vectors)
        assert store.search_vector("c", vectors[3], 1)[0]["id"] == "d3"
        frozen = _server_processes(pg_cluster)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        outcome: dict = {}

        def search() -> None:
            t0 = time.monotonic()
            try:
                outcome["result"] = store.search_vector("c", vectors[3], 1)
            except Exception as exc:
                outcome["error"] = exc
            outcome["s"] = time.monotonic() - t0

        thread = threading.Thread(target=search, daemon=True)
        thread.start()
        thread.join(20)
        assert "s" in outcome, "a search against a frozen server still waits after 20 s"
        assert isinstance(outcome.get("error"), StorageUnavailable), outcome
        assert outcome["error"].reason == UNREACHABLE[0] and outcome["s"] < 15
        assert PASSWORD not in str(outcome["error"])
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 20
        while True:  # the pool reconnects in the background
            try:
                assert store.search_vector("c", vectors[5], 1)[0]["id"] == "d5"
                break
            except StorageUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        store.close()


def test_a_transaction_the_server_ended_for_idleness_is_a_retryable_503(pg_url, monkeypatch):
    """A worker stalled inside its consistent read for longer than the server lets a
    transaction idle (60 s; 1 s here) gets StorageBusy (503), not an error of its own;
    a builder's long read is not limited at all."""
    import retrieval.collections.postgres_db as pgdb
    from retrieval.collections.documents import Document
    from retrieval.errors import StorageBusy
    from tests.snapshot_worker import VectorClient

    monkeypatch.setattr(pgdb, "IDLE_IN_TRANSACTION_S", 1)
    store = CollectionStore(pg_url, VectorClient(8), snapshots=False)
    try:
        vectors = np.eye(8, dtype=np.float32)
        store.create("c", {"index": "flat"})
        store.write_embedded("c", [Document(f"d{i}", "x", None, {}, [(0, 1)]) for i in range(8)], vectors)
        original = store.db.log_state

        def stalled(conn, cid):
            time.sleep(1.5)  # stands for a stall of over a minute
            return original(conn, cid)

        monkeypatch.setattr(store.db, "log_state", stalled)
        with pytest.raises(StorageBusy):
            store.search_vector("c", vectors[0], 1)
        monkeypatch.setattr(store.db, "log_state", original)
        assert store.search_vector("c", vectors[0], 1)[0]["id"] == "d0"  # the pool dropped the ended session
        with store.db.read() as conn, store.db.consistent(conn, bulk=True):  # the builder's read
            time.sleep(1.5)
            assert store.db.log_state(conn, 1)[0] == 8
    finally:
        store.close()
