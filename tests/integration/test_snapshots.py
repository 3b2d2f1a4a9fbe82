"""One copy of the vectors per host: index snapshots shared by worker
processes, with real FAISS, real files, real builder and worker processes
(no sidecar: the stores are written and searched with given vectors).

The tests of what the database holds (answers, replay, rebuilds under
searches, compaction, the floor, the schema) run against both stores: a
SQLite data directory of their own, and a database of their own on the
session's PostgreSQL cluster (tests/postgres.py) with a data directory per
host. Memory sharing and killed builders are about the files and processes
of one host, and run on SQLite only."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest

from retrieval.collections.database import is_postgres
from retrieval.collections.documents import Document
from retrieval.collections.factory import store_status
from retrieval.collections.snapshot_disk import (
    BUILD_DIR,
    HOST_FILE,
    INDEX_DIR,
    LOCK_FILE,
    build_running,
    generation_dir,
    generations,
    index_root,
)
from retrieval.collections.snapshot_files import INDEX_FILE
from retrieval.collections.snapshot_index import LayeredIndex
from retrieval.collections.snapshot_manager import LOG_GROWTH
from retrieval.collections.sqlite_db import DB_FILE
from retrieval.collections.storage import NEWER
from retrieval.collections.store import CollectionStore
from retrieval.errors import StorageUnavailable
from shm_protocol.processes import pss_mb, rss_mb
from tests.helpers import REPO
from tests.postgres import STORES
from tests.snapshot_worker import LOCATION, VectorClient, served

DIM = 32
#: 293 MiB of float32 vectors: enough for sharing to show in PSS, few rows to write.
BIG_N, BIG_DIM = 50_000, 1536
NEVER = 10**9  # a delta threshold no test reaches: builds happen when the test says
#: The PostgreSQL stores' URLs carry this password (the test cluster trusts loopback and ignores it):
#: it must never show on a builder's command line or in its log.
PASSWORD = "pw-snapshot-never-shown-51c2"


@dataclass(frozen=True)
class Where:
    """A collection store, and one host's data directory (its snapshots)."""

    location: str
    data: Path

    @property
    def postgres(self) -> bool:
        return is_postgres(self.location)

    def host(self, data: Path) -> Where:
        """Another host of the same store (SQLite has one host: a test's stand-in for one)."""
        return Where(self.location, data)


@pytest.fixture(params=STORES)
def where(request, tmp_path) -> Where:
    if request.param == "sqlite":
        return Where(str(tmp_path), tmp_path)  # the store's directory is the host's data directory
    parts = urlsplit(request.getfixturevalue("pg_url"))
    url = urlunsplit(parts._replace(netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port}"))
    return Where(url, tmp_path / "host-a")


def unit(rng, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def docs(ids, per_doc: int = 1, metadata=None) -> list[Document]:
    return [Document(i, "x" * per_doc, None, metadata(i) if metadata else {}, [(j, j + 1) for j in range(per_doc)])
            for i in ids]


def open_store(where: Where | Path, dim: int = DIM, **kwargs) -> CollectionStore:
    if isinstance(where, Path):
        where = Where(str(where), where)
    return CollectionStore(where.location, VectorClient(dim), snapshot_dir=where.data, **kwargs)


def cid_of(store: CollectionStore, name: str) -> int:
    with store.db.read() as conn:
        return store._row(conn, name).cid


def sql(where: Where | Path, statement: str) -> list[tuple]:
    """Rows of ``statement`` (no parameters) run straight on the store's database, around the store."""
    location = where.location if isinstance(where, Where) else str(where)
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            cur = conn.execute(statement)
            return [tuple(r) for r in cur] if cur.description else []
    db = sqlite3.connect(Path(location) / DB_FILE, isolation_level=None)
    try:
        return [tuple(r) for r in db.execute(statement)]
    finally:
        db.close()


def changes(where, cid: int) -> list[int]:
    return [r[0] for r in sql(where, f"SELECT seq FROM changes WHERE cid = {cid} ORDER BY seq")]


def pairs(answer) -> list[tuple[str, float]]:
    """(id, score) of each result of a store's answer (dicts) or a worker's ([id, score] lists)."""
    return [(r["id"], r["score"]) if isinstance(r, dict) else (r[0], r[1]) for r in answer]


def assert_defined_order(answer) -> None:
    """Best first; results of exactly equal score in ascending document id order."""
    got = pairs(answer)
    for (a, sa), (b, sb) in zip(got, got[1:]):
        assert sa > sb or (sa == sb and a < b), f"{a} ({sa!r}) before {b} ({sb!r})"


def assert_same_answer(got, want, atol: float = 1e-5) -> None:
    """Two answers to one query from two paths (snapshot or not, one process or another)
    agree up to float rounding between SIMD code paths: scores within ``atol``, each run
    of nearly equal scores the same documents (the last run may be cut by top_k, where
    a score one rounding apart may fall either side), and each answer in the defined order."""
    got, want = pairs(got), pairs(want)
    assert len(got) == len(want), (got, want)
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=atol, rtol=0), (got, want)
    assert_defined_order(got)
    assert_defined_order(want)
    start = 0
    for end in range(1, len(want) + 1):
        if end == len(want) or want[end - 1][1] - want[end][1] > atol:
            if end < len(want):
                assert {d for d, _ in got[start:end]} == {d for d, _ in want[start:end]}, (got, want)
            start = end


def floor_of(store: CollectionStore, cid: int) -> int:
    with store.db.read() as conn:
        return store.db.log_state(conn, cid)[1]


class Worker:
    """A worker process searching the store (tests/snapshot_worker.py)."""

    def __init__(self, where: Where | Path, dim: int, log, **kwargs):
        if isinstance(where, Path):
            where = Where(str(where), where)
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env[LOCATION] = where.location
        kwargs.setdefault("snapshot_dir", str(where.data))
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "snapshot_worker.py"), str(dim), json.dumps(kwargs)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"), text=True)

    def ask(self, timeout: float = 60, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"worker did not answer {cmd['op']}:\n{self.log.read_text()[-3000:]}")
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.wait()}:\n{self.log.read_text()[-3000:]}"
        return json.loads(line)

    def search(self, name: str, vector, top_k: int = 10, filter=None) -> dict:
        return self.ask(op="search", name=name, vector=np.asarray(vector).tolist(), top_k=top_k, filter=filter)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A flat collection of BIG_N vectors of BIG_DIM and its first snapshot; (data dir, some stored vectors)."""
    path = tmp_path_factory.mktemp("big")
    store = open_store(path, BIG_DIM, snapshot_delta=NEVER)
    store.create("big", {"index": "flat"})
    rng = np.random.default_rng(3)
    first = None
    for a in range(0, BIG_N, 5000):
        vectors = unit(rng, 5000, BIG_DIM)
        first = vectors[:100:50] if first is None else first
        store.write_embedded("big", docs([f"d{a + i}" for i in range(0, 5000, 50)], 50), vectors)
    store.snapshots.build(cid_of(store, "big"))
    store.close()
    return path, first


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_snapshot_and_the_changes_since_answer_as_one_index(where, kind):
    """Same ids and scores as a store without snapshots (today's exhaustive or
    IVF index over the same passages and centroids), after adds, deletes and
    replacements, filtered or not, and across a switch of generation; old
    generations go once no process has them open; files are private."""
    rng = np.random.default_rng(7)
    writer = open_store(where, snapshots=False, nprobe=4)  # trains the IVF quantizer in the write, as before

    def meta(doc_id):
        return {"g": int(doc_id[1:]) % 5}

    writer.create("kb", {"index": kind})
    writer.write_embedded("kb", docs([f"a{i}" for i in range(1500)], 2, meta), unit(rng, 3000))
    shared = open_store(where, nprobe=4, snapshot_delta=NEVER)
    cid = cid_of(shared, "kb")
    old_umask = os.umask(0o022)
    try:
        assert shared.snapshots.build(cid)["kind"] == kind
    finally:
        os.umask(old_umask)
    root = shared.snapshots.root
    cdir = root / str(cid)
    assert root == where.data / INDEX_DIR if not where.postgres else root.parent == where.data / INDEX_DIR
    for p in (where.data, root, cdir, generation_dir(cdir, 1)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in (root / HOST_FILE, cdir / LOCK_FILE, *generation_dir(cdir, 1).iterdir()):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    queries = unit(rng, 12)

    def answers_as_one_index():
        plain = open_store(where, snapshots=False, nprobe=4)  # a process without snapshots, loading now
        try:
            for q in queries:
                for top_k, flt in ((10, None), (200, None), (10, {"g": 3}), (5, {"g": [1, 2]}), (3, {"g": 9})):
                    want = plain.search_vector("kb", q, top_k, flt)
                    assert_same_answer(shared.search_vector("kb", q, top_k, flt), want)
            count = plain.info("kb")["passages"]
            assert shared._loaded["kb"].index.ntotal == count == plain._loaded["kb"].index.ntotal
        finally:
            plain.close()

    answers_as_one_index()
    assert isinstance(shared._loaded["kb"].index, LayeredIndex) and served(shared, "kb")[0] == 1
    writer.write_embedded("kb", docs([f"b{i}" for i in range(300)], 2, meta), unit(rng, 600))  # adds
    for i in range(0, 1500, 30):
        writer.delete_document("kb", f"a{i}")  # snapshot passages hidden
    writer.write_embedded("kb", docs([f"a{i}" for i in range(1, 200, 2)], 2, meta), unit(rng, 200))  # replaced
    writer.delete_document("kb", "b5")  # passages of the delta removed
    answers_as_one_index()
    layered = shared._loaded["kb"].index
    assert layered.delta.ntotal == 600 + 200 - 2 and len(layered.hidden) == 2 * (50 + 100)
    assert served(shared, "kb")[0] == 1  # all of it without a rebuild
    del layered

    assert shared.snapshots.build(cid)["generation"] == 2
    assert generations(cdir) == [1, 2]  # generation 1 is still open in `shared`
    answers_as_one_index()
    assert served(shared, "kb")[0] == 2 and shared._loaded["kb"].index.pending == 0
    assert shared.snapshots.build(cid) is None  # nothing new: no generation; generation 1 is free now
    assert generations(cdir) == [2]
    writer.close()
    shared.close()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_equal_scores_answer_in_one_defined_order_on_every_path(where, kind, tmp_path):
    """Documents of identical vectors (exactly equal scores) answer in document id order,
    the tied passages of one document by passage number, and a top_k that cuts through
    them keeps the smallest ids: the same answer from a snapshot plus its delta, after a
    rebuild, from a store without snapshots and from worker processes of both kinds,
    filtered or not. The later ids are written first, some in the snapshot and some in
    its delta, so that no insertion or FAISS order gives the defined one by chance."""
    rng = np.random.default_rng(31)
    tie, up = unit(rng, 2)
    near = tie + 0.2 * up
    near /= np.linalg.norm(near)  # scores 1 for the "top" documents, then the tied ones, then the rest

    def doc(doc_id: str, g: int, passages: int = 1) -> Document:
        return Document(doc_id, "ab"[:passages], None, {"g": g}, [(j, j + 1) for j in range(passages)])

    tied = [f"t{i:02d}" for i in range(12)]
    first = [doc(d, i % 2) for i, d in enumerate(tied)][6:][::-1]  # t11 ... t06
    filler = [doc(f"f{i:04d}", 9) for i in range(1100)]
    writer = open_store(where, snapshots=False, nprobe=32)
    writer.create("kb", {"index": kind})
    writer.write_embedded("kb", first + filler, np.vstack([np.repeat(tie[None], 6, 0), unit(rng, 1100)]))
    shared = open_store(where, nprobe=32, snapshot_delta=NEVER)
    cid = cid_of(shared, "kb")
    assert shared.snapshots.build(cid)["kind"] == kind
    later = [doc(d, i % 2, 2 if d == "t04" else 1) for i, d in enumerate(tied)][:6][::-1]  # t05 ... t00
    writer.write_embedded("kb", later, np.repeat(tie[None], 7, 0))
    writer.write_embedded("kb", [doc("t08", 0)], tie[None])  # moved from the snapshot to the delta
    writer.write_embedded("kb", [doc("top1", 7), doc("top0", 7)], np.repeat(near[None], 2, 0))
    plain = open_store(where, snapshots=False, nprobe=32)
    workers = [Worker(where, DIM, tmp_path / "w-snap.log", snapshot_delta=NEVER, nprobe=32),
               Worker(where, DIM, tmp_path / "w-plain.log", snapshots=False, nprobe=32)]
    expected = [(tie, k, None, tied[:k]) for k in (1, 4, 5, 11, 12)]
    expected += [(tie, 3, {"g": 1}, ["t01", "t03", "t05"]), (tie, 2, {"g": [0, 7]}, ["t00", "t02"]),
                 (near, 5, None, ["top0", "top1", "t00", "t01", "t02"]),
                 (near, 4, {"g": [0, 1]}, ["t00", "t01", "t02", "t03"])]
    queries = unit(rng, 6)

    def answers(search) -> None:
        for q, top_k, flt, ids in expected:
            got = search(q, top_k, flt)
            assert [r[0] for r in pairs(got)] == ids, (top_k, flt)
            assert_defined_order(got)
        for q in queries:
            for top_k in (10, 200):
                assert_same_answer(search(q, top_k, None), plain.search_vector("kb", q, top_k))

    try:
        answers(lambda q, k, f: shared.search_vector("kb", q, k, f))
        assert served(shared, "kb")[0] == 1 and shared._loaded["kb"].index.delta.ntotal == 10
        answers(lambda q, k, f: plain.search_vector("kb", q, k, f))
        for worker in workers:
            answers(lambda q, k, f, worker=worker: worker.search("kb", q, k, f)["results"])
        assert workers[0].search("kb", tie, 1)["generation"] == 1
        assert workers[1].search("kb", tie, 1)["generation"] is None
        best = {r["id"]: r["passage"] for r in shared.search_vector("kb", tie, 12)}
        assert best["t04"] == "a"  # of its two tied passages, the first
        assert {r["id"]: r["passage"] for r in plain.search_vector("kb", tie, 12)}["t04"] == "a"
        assert shared.snapshots.build(cid)["generation"] == 2
        answers(lambda q, k, f: shared.search_vector("kb", q, k, f))  # all of it in the snapshot now
        assert served(shared, "kb")[0] == 2 and shared._loaded["kb"].index.pending == 0
    finally:
        for worker in workers:
            worker.close()
        for store in (writer, shared, plain):
            store.close()


def test_a_small_collection_s_change_log_stays_a_few_times_its_size(where, tmp_path):
    """A collection far below SHM_EMBED_SNAPSHOT_DELTA whose documents are replaced
    over and over: a worker that replays more changes than a few times the live
    passages asks for a snapshot build, which compacts the log, so the log stays
    bounded however long the history; a new worker process and a new store without
    snapshots answer the current vectors without replaying the history."""
    rng = np.random.default_rng(41)
    store = open_store(where, snapshot_delta=NEVER)
    store.snapshots.build_pause_s = 0.0  # every build when due: the bound is checked after each search
    store.snapshots.log_min = 40
    store.create("kb", {"index": "flat"})
    n = 20
    live = dict(zip([f"d{i}" for i in range(n)], unit(rng, n)))
    store.write_embedded("kb", docs(list(live)), np.array(list(live.values())))
    cid = cid_of(store, "kb")
    bound = max(LOG_GROWTH * n, store.snapshots.log_min)
    longest = 0
    try:
        for round_ in range(200):  # 400 changes: 20 times the collection
            doc_id = f"d{round_ % n}"
            live[doc_id] = unit(rng, 1)[0]
            store.write_embedded("kb", docs([doc_id]), live[doc_id][None])
            assert store.search_vector("kb", live[doc_id], 1)[0]["id"] == doc_id
            store.snapshots.join()  # a build it asked for is done
            longest = max(longest, len(changes(where, cid)))
        assert longest <= bound, f"{longest} changes logged for {n} live passages"
        assert served(store, "kb")[0] > 1 and floor_of(store, cid) > 0
        worker = Worker(where, DIM, tmp_path / "worker.log", snapshot_delta=NEVER)
        plain = open_store(where, snapshots=False)
        try:
            for doc_id, vector in live.items():
                answer = worker.search("kb", vector, 3)
                assert answer["results"][0][0] == doc_id and answer["generation"] is not None
                assert plain.search_vector("kb", vector, 1)[0]["id"] == doc_id
            assert plain._loaded["kb"].index.ntotal == n
        finally:
            worker.close()
            plain.close()
    finally:
        store.close()


def test_worker_processes_share_one_copy_of_the_vectors(big, tmp_path):
    path, probes = big
    copy_mb = BIG_N * BIG_DIM * 4 / 2**20
    workers = [Worker(path, BIG_DIM, tmp_path / f"w{i}.log", snapshot_delta=NEVER) for i in range(4)]
    try:
        for worker in workers:
            answer = worker.search("big", probes[0], 3)  # a flat search reads every vector
            assert answer["results"][0][0] == "d0" and answer["generation"] is not None
        pss = [pss_mb(w.proc.pid) for w in workers]
        rss = [rss_mb(w.proc.pid) for w in workers]
    finally:
        for worker in workers:
            worker.close()
    private = Worker(path, BIG_DIM, tmp_path / "private.log", snapshots=False)  # today's: a copy of its own
    try:
        assert private.search("big", probes[0], 3)["results"][0][0] == "d0"
        private_pss = pss_mb(private.proc.pid)
    finally:
        private.close()
    print(f"\none copy of the vectors: {copy_mb:.0f} MiB; 4 workers on the snapshot: PSS "
          f"{' + '.join(f'{p:.0f}' for p in pss)} = {sum(pss):.0f} MiB (RSS {min(rss):.0f}-{max(rss):.0f} each); "
          f"a worker without snapshots: PSS {private_pss:.0f} MiB")
    assert min(rss) > copy_mb  # each one maps every page of the vectors and has read them...
    assert sum(pss) < 2 * copy_mb  # ...and the four hold about one copy between them (four copies: > 4x)
    assert private_pss > copy_mb


def test_a_write_is_visible_to_the_next_search_of_another_process_before_any_rebuild(where, tmp_path):
    rng = np.random.default_rng(5)
    store = open_store(where, snapshot_delta=NEVER)
    store.create("kb", {"index": "flat"})
    vectors = unit(rng, 2000)
    store.write_embedded("kb", docs([f"a{i}" for i in range(2000)]), vectors)
    cid = cid_of(store, "kb")
    store.snapshots.build(cid)
    worker = Worker(where, DIM, tmp_path / "worker.log", snapshot_delta=NEVER)
    try:
        assert worker.search("kb", vectors[3], 1)["generation"] == 1
        fresh, moved = unit(rng, 2)
        store.write_embedded("kb", docs(["fresh"]), fresh[None])
        store.delete_document("kb", "a3")
        store.write_embedded("kb", docs(["a4"]), moved[None])  # replaced: a new vector
        answer = worker.search("kb", fresh, 1)
        assert answer["results"][0][0] == "fresh" and answer["results"][0][1] == pytest.approx(1.0, abs=1e-5)
        assert "a3" not in [r[0] for r in worker.search("kb", vectors[3], 50)["results"]]
        near_old = worker.search("kb", vectors[4], 2000)["results"]
        assert dict(near_old)["a4"] == pytest.approx(float(moved @ vectors[4]), abs=1e-5)
        assert worker.search("kb", moved, 1)["results"][0] == ["a4", pytest.approx(1.0, abs=1e-5)]
        assert answer["generation"] == 1 and generations(store.snapshots.collection_dir(cid)) == [1]  # no rebuild
    finally:
        worker.close()
        store.close()


def test_rebuilds_under_concurrent_searches_never_answer_wrong(where):
    """Searches in threads of one worker while another process writes and
    the worker's own builder processes write new generations (and compact
    the log): every document whose write returned before a search began is
    found by its vector, and no document whose delete returned before is
    ever in an answer."""
    rng = np.random.default_rng(11)
    writer = open_store(where, snapshots=False)
    writer.create("live", {"index": "flat"})
    base = unit(rng, 2000)
    writer.write_embedded("live", docs([f"a{i}" for i in range(2000)]), base)
    reader = open_store(where, snapshot_delta=150)  # asks for a build every 150 changes
    reader.snapshots.build_pause_s = 0.2
    known = {f"a{i}": base[i] for i in range(2000)}  # documents whose write returned, and their vectors
    gone: set[str] = set()  # documents whose delete returned
    busy: set[str] = set()  # documents being written or deleted now
    lock = threading.Lock()
    errors: list[str] = []
    seen_generations: set = set()
    searches = [0]
    stop = threading.Event()

    def search_loop(seed: int) -> None:
        generator = np.random.default_rng(seed)
        while not stop.is_set():
            with lock:
                ids = [d for d in known if d not in busy]
                dead = set(gone)
                doc = ids[int(generator.integers(len(ids)))]
                vector = known[doc]
            try:
                got = [x["id"] for x in reader.search_vector("live", vector, 10)]
            except Exception as exc:
                errors.append(f"search failed: {exc!r}")
                return
            with lock:
                unchanged = doc not in busy and known.get(doc) is vector
            if unchanged and (not got or got[0] != doc):
                errors.append(f"{doc} not found first: {got[:3]}")
            if dead & set(got):
                errors.append(f"deleted documents answered: {dead & set(got)}")
            seen_generations.add(served(reader, "live")[0])
            searches[0] += 1

    threads = [threading.Thread(target=search_loop, args=(s,)) for s in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 40
        round_ = 0
        while time.monotonic() < deadline and (len(seen_generations - {None}) < 3 or round_ < 8) and not errors:
            new_ids = [f"n{round_}-{i}" for i in range(60)]
            new_vectors = unit(rng, 60)
            writer.write_embedded("live", docs(new_ids), new_vectors)
            with lock:
                known.update(zip(new_ids, new_vectors))
                victims = [str(d) for d in rng.choice(sorted(known), 12, replace=False)]
                busy.update(victims)
            for victim in victims[:8]:
                writer.delete_document("live", victim)
            replaced = unit(rng, 4)
            writer.write_embedded("live", docs(victims[8:]), replaced)
            with lock:
                for victim in victims[:8]:
                    known.pop(victim)
                    gone.add(victim)
                known.update(zip(victims[8:], replaced))
                gone.difference_update(victims[8:])
                busy.clear()
            round_ += 1
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        reader.close()
        writer.close()
    assert not errors, errors[:5]
    assert len(seen_generations - {None}) >= 3, seen_generations  # it switched generations while searching
    assert searches[0] > 100


def test_a_builder_killed_mid_build_leaves_the_old_snapshot_serving(big, tmp_path):
    path, _ = big
    rng = np.random.default_rng(9)
    store = open_store(path, BIG_DIM, snapshot_delta=NEVER)
    cid = cid_of(store, "big")
    cdir = store.snapshots.collection_dir(cid)
    before = generations(cdir)
    fresh = unit(rng, 1, BIG_DIM)
    store.write_embedded("big", docs(["fresh"]), fresh)  # something a new generation would hold
    log = tmp_path / "builder.log"
    builder = subprocess.Popen(store.snapshots.build_command(cid), cwd=REPO, env=store.snapshots.build_env(),
                               stderr=log.open("wb"))
    deadline = time.monotonic() + 60
    while not (cdir / BUILD_DIR / INDEX_FILE).exists():  # it is writing the new generation
        assert builder.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert generations(cdir) == before and (cdir / BUILD_DIR).exists()  # the half generation is not one
    assert not build_running(cdir)  # the kernel released its lock
    worker = open_store(path, BIG_DIM, snapshot_delta=NEVER)
    try:
        best = worker.search_vector("big", fresh[0], 1)[0]
        assert best["id"] == "fresh" and served(worker, "big")[0] == before[-1]
        meta = store.snapshots.build(cid)  # a later build succeeds and clears what the killed one left
        assert meta["generation"] == before[-1] + 1 and not (cdir / BUILD_DIR).exists()
        assert worker.search_vector("big", fresh[0], 1)[0]["id"] == "fresh"
        assert served(worker, "big")[0] == meta["generation"]
    finally:
        worker.close()
        store.close()


def test_compaction_deletes_only_what_every_live_host_covers(where, tmp_path):
    """Each host records what its snapshot covers; the log is compacted up to
    the smallest mark of the hosts seen within the horizon, the floor raised
    first; marks and floor go with their collection."""
    rng = np.random.default_rng(2)
    here = open_store(where, snapshot_delta=NEVER)
    here.create("kb", {"index": "flat"})
    cid = cid_of(here, "kb")
    other = open_store(where.host(tmp_path / "host-b"), snapshot_delta=NEVER)  # another host of the same store
    assert other.snapshots.host != here.snapshots.host

    def write(n: int) -> int:
        here.write_embedded("kb", docs([f"d{rng.integers(1 << 40)}" for _ in range(n)]), unit(rng, n))
        return max(changes(where, cid))

    first = write(100)
    other.snapshots.mark_and_compact(cid, first - 60)  # the only live mark: up to it goes
    assert min(changes(where, cid)) == first - 59 and floor_of(here, cid) == first - 60
    last = write(50)
    here.snapshots.build(cid)  # this host covers everything, host B does not: nothing more goes
    assert changes(where, cid)[0] == first - 59 and floor_of(here, cid) == first - 60
    other.snapshots.mark_and_compact(cid, first + 20)  # B caught up partly
    assert changes(where, cid)[0] == first + 21 and changes(where, cid)[-1] == last
    sql(where, f"UPDATE snapshot_marks SET updated = updated - {here.snapshots.stale_host_s + 60} "
               f"WHERE host = '{other.snapshots.host}'")  # B has been away past the horizon
    last = write(10)
    here.snapshots.build(cid)
    assert changes(where, cid) == [] and floor_of(here, cid) == last
    marks = dict(sql(where, f"SELECT host, seq FROM snapshot_marks WHERE cid = {cid}"))
    assert marks == {here.snapshots.host: last, other.snapshots.host: first + 20}
    other.snapshots.mark_and_compact(cid, first + 30)  # a host back from away never lowers the floor
    assert floor_of(here, cid) == last
    here.delete("kb")  # marks and floor go with the collection
    assert sql(where, "SELECT count(*) FROM snapshot_marks") == [(0,)]
    assert sql(where, "SELECT count(*) FROM change_floor") == [(0,)]
    here.close()
    other.close()


def test_a_worker_behind_the_compaction_reloads_from_the_tables(where, tmp_path, capfd):
    """A process without snapshots, and a worker of a host whose snapshot is
    older than the log's floor (away past the horizon while another host
    compacted), cannot replay what they missed: they load the tables, answer
    what a fresh store answers, and the worker asks for a new generation,
    which its builder process writes (reaching the store without the URL's
    password on its command line or in its log)."""
    rng = np.random.default_rng(4)
    writer = open_store(where, snapshots=False)
    writer.create("kb", {"index": "flat"})
    vectors = unit(rng, 300)
    writer.write_embedded("kb", docs([f"a{i}" for i in range(300)]), vectors)
    cid = cid_of(writer, "kb")
    here = open_store(where, snapshot_delta=NEVER)
    here.snapshots.build(cid)  # this host's snapshot: the changes up to 300
    plain = open_store(where, snapshots=False)
    plain.search_vector("kb", vectors[0], 1)  # applied the changes up to 300
    added = unit(rng, 50)
    writer.write_embedded("kb", docs([f"b{i}" for i in range(50)]), added)
    for i in range(10):
        writer.delete_document("kb", f"a{i}")
    writer.write_embedded("kb", docs(["a10"]), unit(rng, 1))
    sql(where, "UPDATE snapshot_marks SET updated = 0")  # this host was away...
    other = open_store(where.host(tmp_path / "host-b"), snapshot_delta=NEVER)
    last = max(changes(where, cid))
    other.snapshots.mark_and_compact(cid, last)  # ...while another host compacted everything
    assert changes(where, cid) == []
    worker = open_store(where, snapshot_delta=20)  # a worker of this host starting now
    reference = open_store(where, snapshots=False)
    for store in (plain, worker):
        for q in (vectors[0], vectors[10], vectors[11], added[7]):
            want = reference.search_vector("kb", q, 20)
            assert [r["id"] for r in store.search_vector("kb", q, 20)] == [r["id"] for r in want]
        assert store._loaded["kb"].seq == last and store._loaded["kb"].index.ntotal == 340
    assert served(worker, "kb")[0] is None  # not generation 1 plus a replay: that would miss the changes
    capfd.readouterr()
    worker.snapshots.join()  # it asked for a build (it holds more than 20 passages of its own)
    assert worker.search_vector("kb", added[7], 1)[0]["id"] == "b7"
    assert served(worker, "kb") == (2, last)
    builder_log = capfd.readouterr().err  # the builder process writes its log to the worker's stderr
    assert "snapshot generation 2 written" in builder_log
    argv = worker.snapshots.build_command(cid)
    assert PASSWORD not in " ".join(argv) and PASSWORD not in builder_log
    if where.postgres:
        assert worker.snapshots.build_env()["SHM_EMBED_COLLECTIONS_URL"] == where.location
    for store in (writer, here, plain, other, worker, reference):
        store.close()


def test_a_database_without_the_snapshot_tables_is_migrated_and_a_newer_one_refused(where):
    """An existing database of schema version 1 (before snapshots) gets the
    new tables when a store opens it; one of a newer version than this code
    knows is refused (as an older service refuses one with snapshots)."""
    if where.postgres:
        import psycopg

        from retrieval.collections.postgres_db import MIGRATIONS, SCHEMA_TABLE, SCHEMA_VERSION

        with psycopg.connect(where.location, autocommit=True) as conn, conn.transaction():
            conn.execute(MIGRATIONS[0])
            conn.execute(f"CREATE TABLE {SCHEMA_TABLE} (version integer PRIMARY KEY, "
                         "applied timestamptz NOT NULL DEFAULT now())")
            conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (1)")
            conn.execute("INSERT INTO collections (name, model, dim, options, created) "
                         "VALUES ('old', 'test-vectors', 32, '{\"index\": \"flat\"}', 1)")
        version = f"SELECT max(version) FROM {SCHEMA_TABLE}"
        newer = f"INSERT INTO {SCHEMA_TABLE} (version) VALUES ({SCHEMA_VERSION + 1})"
    else:
        from retrieval.collections.sqlite_db import SCHEMA, SCHEMA_VERSION

        v1 = SCHEMA.split("-- Per host and collection")[0] + "PRAGMA user_version = 1;"
        where.data.mkdir(exist_ok=True)
        db = sqlite3.connect(where.data / DB_FILE)
        db.executescript(v1)
        db.execute("INSERT INTO collections (name, model, dim, options, created) "
                   "VALUES ('old', 'test-vectors', 32, '{\"index\": \"flat\"}', 1)")
        db.commit()
        db.close()
        version = "PRAGMA user_version"
        newer = f"PRAGMA user_version = {SCHEMA_VERSION + 1}"
    assert sql(where, version) == [(1,)]
    store = open_store(where, snapshot_delta=NEVER)
    assert sql(where, version) == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 2
    cid = cid_of(store, "old")
    store.write_embedded("old", docs(["a", "b"]), unit(np.random.default_rng(1), 2))
    assert store.snapshots.build(cid)["ntotal"] == 2  # the marks and the floor are there
    assert floor_of(store, cid) == 2 and changes(where, cid) == []
    store.close()
    sql(where, newer)
    with pytest.raises(StorageUnavailable) as caught:
        open_store(where)
    assert caught.value.reason == NEWER[0]
    assert store_status(where.location) == (False, f"collection store unavailable: {NEWER[0]}")  # /ready


def test_a_relative_data_directory_is_where_the_builder_builds(where, tmp_path, monkeypatch):
    """The builder process runs in the project's folder: a data directory (and a SQLite
    store) given relative to this process's folder must still be the one it opens."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    relative = Path("rel-data")
    stray = REPO / relative
    assert not stray.exists()
    store = CollectionStore(where.location if where.postgres else str(relative), VectorClient(DIM),
                            snapshot_dir=relative, snapshot_delta=NEVER)
    try:
        rng = np.random.default_rng(11)
        store.create("kb", {"index": "flat"})
        vectors = unit(rng, 20)
        store.write_embedded("kb", docs([f"a{i}" for i in range(20)]), vectors)
        cid = cid_of(store, "kb")
        store.snapshots.request_build(cid, "test")
        store.snapshots.join(60)
        assert generations(index_root(run / relative, store.db) / str(cid)) == [1]
        assert store.search_vector("kb", vectors[2], 1)[0]["id"] == "a2" and served(store, "kb")[0] == 1
    finally:
        store.close()
        exists = stray.exists()
        shutil.rmtree(stray, ignore_errors=True)  # what a builder that got the wrong folder made
    assert not exists, "the builder opened a data directory relative to its own folder"


def test_an_old_generation_goes_when_its_last_reader_switches_and_a_deleted_collection_s_folder_at_once(where):
    rng = np.random.default_rng(12)
    store = open_store(where, snapshot_delta=NEVER)
    other = open_store(where, snapshot_delta=NEVER)  # a second reader of this host
    try:
        store.create("kb", {"index": "flat"})
        store.write_embedded("kb", docs([f"a{i}" for i in range(50)]), unit(rng, 50))
        cid = cid_of(store, "kb")
        cdir = store.snapshots.collection_dir(cid)
        store.snapshots.build(cid)
        store.search_vector("kb", unit(rng, 1)[0], 3)
        other.search_vector("kb", unit(rng, 1)[0], 3)
        assert served(store, "kb")[0] == served(other, "kb")[0] == 1
        store.write_embedded("kb", docs(["b"]), unit(rng, 1))
        store.snapshots.build(cid)  # both map generation 1: it stays
        assert generations(cdir) == [1, 2]
        store.search_vector("kb", unit(rng, 1)[0], 3)  # switches; the other reader still maps 1
        assert served(store, "kb")[0] == 2 and generations(cdir) == [1, 2]
        other.search_vector("kb", unit(rng, 1)[0], 3)  # the last reader of 1 switches: 1 goes now
        assert served(other, "kb")[0] == 2 and generations(cdir) == [2]
        other.delete("kb")  # while the first store still maps generation 2
        assert not cdir.exists()
        assert store.list() == []
    finally:
        other.close()
        store.close()


def test_a_collection_deleted_during_a_build_leaves_nothing_and_the_build_succeeds(where, monkeypatch):
    import retrieval.collections.snapshot_manager as snapshot_manager

    rng = np.random.default_rng(13)
    store = open_store(where, snapshot_delta=NEVER)
    other = open_store(where, snapshot_delta=NEVER)
    try:
        store.create("kb", {"index": "flat"})
        store.create("gone-before", {"index": "flat"})
        store.write_embedded("kb", docs([f"a{i}" for i in range(50)]), unit(rng, 50))
        cid, stale = cid_of(store, "kb"), cid_of(store, "gone-before")
        store.snapshots.collection_dir(stale).mkdir(parents=True)  # a folder a sweep must remove
        sql(where, f"DELETE FROM collections WHERE cid = {stale}")
        write = snapshot_manager.write_snapshot

        def write_then_delete(*args, **kwargs):
            out = write(*args, **kwargs)
            other.delete("kb")  # deleted while the builder writes its generation
            return out

        monkeypatch.setattr(snapshot_manager, "write_snapshot", write_then_delete)
        assert store.snapshots.build(cid) is None
        assert not store.snapshots.collection_dir(cid).exists()
        assert not store.snapshots.collection_dir(stale).exists()  # the sweep ran
        assert sql(where, "SELECT count(*) FROM snapshot_marks") == [(0,)]
    finally:
        other.close()
        store.close()


def test_a_database_restored_from_a_backup_is_not_hidden_by_a_newer_snapshot(tmp_path):
    """The database goes back to a backup while index/ stays: a generation covering changes
    the restored log never had is refused (and rebuilt), so writes after the restore are found."""
    rng = np.random.default_rng(14)
    store = open_store(tmp_path, snapshot_delta=NEVER)
    store.create("kb", {"index": "flat"})
    store.write_embedded("kb", docs([f"a{i}" for i in range(50)]), unit(rng, 50))
    backup = sqlite3.connect(tmp_path / "backup.sqlite3")
    live = sqlite3.connect(tmp_path / DB_FILE)
    live.backup(backup)
    store.write_embedded("kb", docs([f"b{i}" for i in range(50)]), unit(rng, 50))
    cid = cid_of(store, "kb")
    store.snapshots.build(cid)
    store.search_vector("kb", unit(rng, 1)[0], 3)
    assert served(store, "kb") == (1, 100)
    backup.backup(live)  # the operator restores the backup; index/ stays
    live.close()
    backup.close()
    fresh = unit(rng, 1)
    try:
        store.write_embedded("kb", docs(["after-restore"]), fresh)
        for s in (store, open_store(tmp_path, snapshot_delta=NEVER)):  # a running worker and a new one
            assert s.search_vector("kb", fresh[0], 1)[0]["id"] == "after-restore"
            assert served(s, "kb")[0] is None and s._loaded["kb"].index.ntotal == 51
            if s is not store:
                s.close()
        assert store.snapshots.build(cid)["seq"] == 51  # the builder does not take generation 1 for current
    finally:
        store.close()
