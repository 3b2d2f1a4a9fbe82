"""Snapshot generations damaged or changed on disk: bytes flipped, ids
permuted at the same size, files truncated in place under a serving worker
(as ``cp`` or ``rsync --inplace`` do when a data directory is restored over a
live one), stray files and wrong metadata. Each is refused with a typed error,
the collection is answered from the tables meanwhile, and a new generation is
built. Real files, real FAISS, real worker and builder processes, SQLite (the
damage is to one host's files, whatever the store)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from loguru import logger

from retrieval.collections.snapshot_disk import generation_dir, generations
from retrieval.collections.snapshot_files import IDS_FILE, INDEX_FILE, META_FILE
from tests.integration.test_snapshots import NEVER, Worker, cid_of, docs, open_store, unit
from tests.snapshot_worker import served

DIM = 32
N = 3000
#: Exact-vector queries per check: each must find its own passage first.
PROBES = 200


def build(path, kind: str, n: int = N, dim: int = DIM):
    """A collection of ``n`` passages with its first snapshot generation; (its folder, the vectors)."""
    store = open_store(path, dim, snapshot_delta=NEVER, nprobe=4)
    store.create("kb", {"index": kind})
    vectors = unit(np.random.default_rng(21), n, dim)
    store.write_embedded("kb", docs([f"d{i}" for i in range(n)]), vectors)
    cid = cid_of(store, "kb")
    assert store.snapshots.build(cid)["kind"] == kind
    cdir = store.snapshots.collection_dir(cid)
    store.close()
    return cdir, vectors


def flip_middle(gen):
    """Bytes inverted in the middle of the index file (its vectors or inverted lists), same size."""
    path = gen / INDEX_FILE
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    path.write_bytes(bytes(data))


def random_bytes(gen):
    """8 random bytes of the index file's second half set to large float exponents, same size."""
    path = gen / INDEX_FILE
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(4)
    for at in rng.integers(len(data) // 2, len(data), 8):
        data[at] = 0x7F
    path.write_bytes(bytes(data))


def permute_ids(gen):
    """ids.npy holding the same ids in another order: same size, still a valid array."""
    path = gen / IDS_FILE
    ids = np.load(path)
    np.save(path, np.random.default_rng(5).permutation(ids))


@pytest.fixture
def logs() -> list[str]:
    """What this process logs during the test."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    yield lines
    logger.remove(sink)


DAMAGE = {"flipped": flip_middle, "random-bytes": random_bytes, "permuted-ids": permute_ids}


def assert_exact(store, vectors, probes=range(0, N, N // PROBES)):
    wrong = [i for i in probes if store.search_vector("kb", vectors[i], 1)[0]["id"] != f"d{i}"]
    assert not wrong, f"{len(wrong)} of {len(probes)} exact queries answered another passage first"


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_damaged_generation_is_served_from_the_tables_and_rebuilt(tmp_path, kind, damage, logs):
    cdir, vectors = build(tmp_path, kind)
    DAMAGE[damage](generation_dir(cdir, 1))
    worker = open_store(tmp_path, snapshot_delta=NEVER, nprobe=4)  # a worker that starts now
    worker.snapshots.build_pause_s = 0.0
    try:
        assert_exact(worker, vectors)
        assert served(worker, "kb")[0] is None  # from the tables
        assert any("checksum" in line and "not used" in line for line in logs), logs  # the log says why
        worker.snapshots.join()  # the rebuild it asked for
        assert generations(cdir) == [1, 2] or generations(cdir) == [2]
        assert_exact(worker, vectors)
        assert served(worker, "kb")[0] == 2
    finally:
        worker.close()


@pytest.mark.parametrize("damage", DAMAGE)
def test_the_builder_does_not_take_a_damaged_generation_for_current(tmp_path, damage):
    cdir, vectors = build(tmp_path, "flat")
    DAMAGE[damage](generation_dir(cdir, 1))
    store = open_store(tmp_path, snapshot_delta=NEVER)
    try:
        meta = store.snapshots.build(cid_of(store, "kb"))  # nothing changed in the tables since generation 1
        assert meta is not None and meta["generation"] == 2
        assert generations(cdir) == [2]  # the damaged one removed
        assert_exact(store, vectors)
        assert served(store, "kb")[0] == 2
    finally:
        store.close()


def stray_file(cdir):
    generation_dir(cdir, 7).write_bytes(b"not a generation")


def wrong_kind(cdir):
    path = generation_dir(cdir, 1) / META_FILE
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, kind="ivf", nlist=4)))


def meta_not_an_object(cdir):
    (generation_dir(cdir, 1) / META_FILE).write_text("[1, 2]")


def index_missing(cdir):
    (generation_dir(cdir, 1) / INDEX_FILE).unlink()


MALFORMED = {"stray-file": stray_file, "wrong-kind": wrong_kind, "meta-not-an-object": meta_not_an_object,
             "index-missing": index_missing}


@pytest.mark.parametrize("malformed", MALFORMED)
def test_a_malformed_generation_is_refused_then_replaced(tmp_path, malformed, logs):
    """A stray file named like a newer generation, a meta.json of another kind
    than its index, one that is not an object, a missing file: every search
    answers (from the tables), and the rebuild it asks for replaces it."""
    cdir, vectors = build(tmp_path, "flat")
    MALFORMED[malformed](cdir)
    worker = open_store(tmp_path, snapshot_delta=NEVER)
    worker.snapshots.build_pause_s = 0.0
    try:
        for _ in range(2):  # not just the first search: none fails
            assert_exact(worker, vectors, range(0, N, 100))
            assert served(worker, "kb")[0] is None
        assert any("not used" in line for line in logs), logs
        worker.snapshots.join()
        newest = max(generations(cdir))
        assert newest > 1 and generation_dir(cdir, newest).is_dir()
        assert_exact(worker, vectors, range(0, N, 100))
        assert served(worker, "kb")[0] == newest
    finally:
        worker.close()


@pytest.mark.parametrize("restored", [False, True], ids=["left-truncated", "copied-back"])
def test_truncating_a_served_generation_in_place_does_not_kill_the_worker(tmp_path, restored):
    """A worker process maps generation 1 and searches it without pause while
    another process truncates its files in place (what ``cp`` or ``rsync
    --inplace`` do over a live data directory), and maybe writes them back:
    the worker never dies, every answer is right (from the tables or a
    snapshot), and it serves a snapshot again afterwards."""
    n = 20_000  # 2.5 MB of vectors: a flat search reads every page of the mapping
    cdir, vectors = build(tmp_path, "flat", n)
    gen = generation_dir(cdir, 1)
    worker = Worker(tmp_path, DIM, tmp_path / "worker.log", snapshot_delta=NEVER)
    probes = list(range(0, n, 997))
    try:
        assert worker.search("kb", vectors[0], 1)["generation"] == 1
        done = threading.Event()
        errors: list[BaseException] = []

        def overwrite():
            try:
                for name in (INDEX_FILE, IDS_FILE):
                    original = (gen / name).read_bytes()
                    with open(gen / name, "r+b") as f:  # in place: the same inode the worker maps
                        f.truncate(0)
                        f.flush()
                        time.sleep(0.2)  # the worker searches meanwhile
                        if restored:
                            f.write(original)
            except BaseException as exc:  # reported by the test's thread
                errors.append(exc)
            finally:
                done.set()

        writer = threading.Thread(target=overwrite)
        writer.start()
        answers, generations_seen = 0, set()
        deadline = time.monotonic() + 120
        while not done.is_set() or answers < 20:
            i = probes[answers % len(probes)]
            answer = worker.search("kb", vectors[i], 1)  # fails when the worker died
            assert answer["results"][0][0] == f"d{i}", answer
            generations_seen.add(answer["generation"])
            answers += 1
            assert time.monotonic() < deadline
        writer.join()
        assert not errors, errors
        assert None in generations_seen  # it let go of the snapshot and read the tables
        while True:  # then a snapshot again: generation 1 as it was, or a rebuilt one
            i = probes[answers % len(probes)]
            answer = worker.search("kb", vectors[i], 1)
            assert answer["results"][0][0] == f"d{i}", answer
            answers += 1
            if answer["generation"] is not None:
                break
            assert time.monotonic() < deadline, "no snapshot served again"
            time.sleep(0.05)
        assert worker.proc.poll() is None
    finally:
        worker.close()
