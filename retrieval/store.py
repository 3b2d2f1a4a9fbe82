"""Vector collections on disk, shared by every worker of the host.

Storage is one SQLite database under ``SHM_EMBED_DATA_DIR`` in WAL mode with
``synchronous=FULL``: every write (a batch of documents, a delete) is one
transaction, so it is durable when it returns and a writer killed half-way
leaves the previous state; concurrent writers from many worker processes
queue on SQLite's lock. The database holds everything, vectors included (as
little-endian float32 blobs), in plain tables that any later vector store can
read: ``collections``, ``documents``, ``passages``, ``centroids`` and
``changes``. The files are private (0700 directory, 0600 files) whatever the
umask, and a failure of the storage itself (a corrupt file, a full disk) is a
typed :class:`StorageUnavailable`: see :mod:`retrieval.storage`.

Names, options and documents are checked (and documents split into
passages) by :mod:`retrieval.documents` before anything here runs.

Each worker keeps a FAISS index per collection in memory (see
:mod:`retrieval.faiss_index`) and brings it up to date before every search by
replaying the ``changes`` log past the last sequence number it has applied, so
a write by any worker is visible to the next search in every worker. Passage
ids are never reused (``AUTOINCREMENT``), which makes replay order-free.

With snapshots (the default, ``SHM_EMBED_SNAPSHOTS``) that index is a shared,
memory-mapped snapshot of the collection plus the changes since it, rebuilt in
the background, and the change log is compacted once every host's snapshot
covers it: see :mod:`retrieval.snapshot`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from loguru import logger

from shm_protocol.config import COLLECTIONS_DB
from shm_protocol.errors import InvalidInput, RequestTooLarge

from .documents import CollectionOptions, Document, check_name, parse_documents
from .errors import CollectionConflict, CollectionNotFound
from .faiss_index import POINTS_PER_CENTROID, PassageIndex, nlist_for, train_centroids
from .snapshot import DELTA_MAX, STALE_HOST_S, SnapshotManager, load_from_tables, log_state, reading
from .storage import narrow_modes, os_storage_error, prepare_files, storage_error

DB_FILE = COLLECTIONS_DB
SCHEMA_VERSION = 1
OP_ADD, OP_DEL = 1, 2
#: Passages of an index "ivf" collection before its quantizer is trained (exhaustive until then).
IVF_EXPLICIT_MIN = 1000
MAX_TOP_K = 1000
_REPLAY_CHUNK = 8192
_LOG_CHANGE = "INSERT INTO changes (cid, op, pid) VALUES (?, ?, ?)"

#: A metadata key a filter may name; it is written into a JSON path literal, so no quotes or backslashes.
_FILTER_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ -]{0,127}")
#: Values a filter lists at most unless the settings say otherwise (SHM_EMBED_FILTER_MAX_VALUES).
FILTER_MAX_VALUES = 1000

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS collections (
    cid INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    dim INTEGER NOT NULL,
    options TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    cid INTEGER NOT NULL REFERENCES collections(cid) ON DELETE CASCADE,
    id TEXT NOT NULL,
    url TEXT,
    metadata TEXT NOT NULL,
    text TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (cid, id)
);
CREATE TABLE IF NOT EXISTS passages (
    pid INTEGER PRIMARY KEY AUTOINCREMENT,
    cid INTEGER NOT NULL,
    doc_id TEXT NOT NULL,
    ord INTEGER NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,
    vector BLOB NOT NULL,
    FOREIGN KEY (cid, doc_id) REFERENCES documents(cid, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS passages_by_doc ON passages(cid, doc_id);
CREATE TABLE IF NOT EXISTS centroids (
    cid INTEGER PRIMARY KEY REFERENCES collections(cid) ON DELETE CASCADE,
    nlist INTEGER NOT NULL,
    data BLOB NOT NULL,
    trained_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cid INTEGER NOT NULL,
    op INTEGER NOT NULL,
    pid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_collection ON changes(cid, seq);
-- Per host and collection: the changes its newest snapshot covers (compaction waits for the live hosts).
CREATE TABLE IF NOT EXISTS snapshot_marks (
    host TEXT NOT NULL,
    cid INTEGER NOT NULL REFERENCES collections(cid) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (host, cid)
);
-- The changes of a collection up to seq were compacted away: a worker behind it reloads from the tables.
CREATE TABLE IF NOT EXISTS change_floor (
    cid INTEGER PRIMARY KEY REFERENCES collections(cid) ON DELETE CASCADE,
    seq INTEGER NOT NULL
);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def _guarded(method):
    """``method`` with its storage failures raised as typed errors (StorageUnavailable,
    StorageBusy) and logged with their details; SQL mistakes stay what they are."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            typed = storage_error(exc, self.path, "opening" if method.__name__ == "__init__" else method.__name__)
            if typed is None:
                raise
            raise typed from None

    return guarded


class _Loaded:
    """One collection's FAISS index in this process and how far it has replayed."""

    def __init__(self, cid: int, dim: int, nprobe: int):
        self.cid = cid
        self.dim = dim
        self.seq = 0
        self.index = PassageIndex(dim, nprobe=nprobe)
        self.lock = threading.Lock()


class CollectionStore:
    """Collections of documents, embedded through ``client`` and searched with FAISS."""

    @_guarded
    def __init__(self, data_dir: str | os.PathLike, client, *, nprobe: int = 32,
                 ivf_min_vectors: int = 50_000, search_threads: int = 1, busy_timeout_s: float = 30.0,
                 filter_max_values: int = FILTER_MAX_VALUES, snapshots: bool = True,
                 snapshot_delta: int = DELTA_MAX, snapshot_stale_host_s: float = STALE_HOST_S):
        self.dir = Path(data_dir)
        self.path = self.dir / DB_FILE
        self.client = client
        self.nprobe = nprobe
        self.ivf_min_vectors = ivf_min_vectors
        self.busy_timeout_s = busy_timeout_s
        self.filter_max_values = filter_max_values
        # FAISS's OpenMP threads are process-wide. A worker searching with every core would
        # take them from the sidecar's model (and OpenMP's spinning threads from each other).
        faiss.omp_set_num_threads(search_threads)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}
        self._model: tuple[str, int] | None = None
        self._conns: list[sqlite3.Connection] = []
        self.snapshots = (SnapshotManager(self, delta_max=snapshot_delta, stale_host_s=snapshot_stale_host_s)
                          if snapshots else None)
        try:
            # One script, one transaction (executescript commits an open transaction before it runs).
            self._conn().executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        except sqlite3.Error:
            self.close()  # a script that failed half-way leaves its transaction, and the write lock, open
            raise
        try:
            narrow_modes(self.path)  # the -wal and -shm files exist now
        except OSError as exc:
            raise os_storage_error(exc, self.path) from None

    @classmethod
    def from_settings(cls, settings, client) -> CollectionStore:
        return cls(settings.data_dir, client, nprobe=settings.search_nprobe,
                   ivf_min_vectors=settings.ivf_min_vectors, search_threads=settings.search_threads,
                   filter_max_values=settings.filter_max_values, snapshots=settings.snapshots,
                   snapshot_delta=settings.snapshot_delta, snapshot_stale_host_s=settings.snapshot_stale_host_s)

    # --- connections and transactions ------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                prepare_files(self.path)  # SQLite would create a missing file with the umask's mode
            except OSError as exc:
                raise os_storage_error(exc, self.path) from None
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")  # the first read of the file: a corrupt one fails here
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error:
                conn.close()
                raise
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextmanager
    def _write(self):
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # SQLITE_BUSY after busy_timeout_s: StorageBusy (see _guarded)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (a full disk) can leave the transaction open, and with it the write
            # lock every other worker's writes would wait on.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    logger.warning("collection store {}: rollback failed: {}", self.path, exc)
            raise

    def close(self) -> None:
        if self.snapshots is not None:
            self.snapshots.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
            self._loaded.clear()
        self._local = threading.local()

    # --- model identity -----------------------------------------------------------
    def model(self) -> tuple[str, int]:
        """(name, dimension) of the model this service embeds with."""
        if self._model is None:
            info = self.client.info()
            self._model = (str(info["model"]), int(info["dimension"]))
        return self._model

    def _row(self, conn: sqlite3.Connection, name: str, *, check_model: bool = True) -> sqlite3.Row:
        check_name(name)
        row = conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            with self._lock:
                self._loaded.pop(name, None)  # deleted by another worker: free its index here too
            raise CollectionNotFound(f"no collection named {name!r}")
        if check_model:
            self._check_model(row)
        return row

    def _check_model(self, row: sqlite3.Row) -> None:
        """CollectionConflict unless the collection was made with this service's model."""
        model, dim = self.model()
        if row["model"] != model or row["dim"] != dim:
            raise CollectionConflict(
                f"collection {row['name']!r} was made with {row['model']} ({row['dim']} dimensions); "
                f"this service embeds with {model} ({dim} dimensions)")

    # --- collections --------------------------------------------------------------
    @_guarded
    def create(self, name: str, options: dict | None = None) -> tuple[dict, bool]:
        """Create a collection; returns (its info, whether it was created now).
        An existing one with the same model (and the same options, when
        given) is returned as it is; otherwise CollectionConflict."""
        check_name(name)
        opts = CollectionOptions.from_dict(options)
        model, dim = self.model()
        with self._write() as conn:
            row = conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO collections (name, model, dim, options, created) VALUES (?, ?, ?, ?, ?)",
                             (name, model, dim, json.dumps(asdict(opts)), time.time()))
                created = True
            else:
                created = False
        if not created:
            self._check_model(row)
            if options is not None and json.loads(row["options"]) != asdict(opts):
                raise CollectionConflict(f"collection {name!r} exists with other options: {row['options']}")
        else:
            logger.info("collection {} created ({}, {} dimensions, {})", name, model, dim, asdict(opts))
        return self.info(name), created

    @_guarded
    def info(self, name: str) -> dict:
        conn = self._conn()
        row = self._row(conn, name, check_model=False)
        cid = row["cid"]
        docs = conn.execute("SELECT count(*) FROM documents WHERE cid = ?", (cid,)).fetchone()[0]
        passages = conn.execute("SELECT count(*) FROM passages WHERE cid = ?", (cid,)).fetchone()[0]
        cent = conn.execute("SELECT nlist FROM centroids WHERE cid = ?", (cid,)).fetchone()
        return {
            "name": row["name"], "model": row["model"], "dimension": row["dim"],
            "documents": docs, "passages": passages, "options": json.loads(row["options"]),
            "index": {"kind": "ivf" if cent else "flat", "nlist": cent[0] if cent else 0,
                      "nprobe": self.nprobe if cent else 0},
            "created": row["created"],
        }

    @_guarded
    def list(self) -> list[dict]:
        names = [r[0] for r in self._conn().execute("SELECT name FROM collections ORDER BY name")]
        out = []
        for name in names:
            try:
                out.append(self.info(name))
            except CollectionNotFound:  # deleted meanwhile
                pass
        return out

    @_guarded
    def delete(self, name: str) -> None:
        with self._write() as conn:
            cid = self._row(conn, name, check_model=False)["cid"]
            conn.execute("DELETE FROM changes WHERE cid = ?", (cid,))
            conn.execute("DELETE FROM collections WHERE cid = ?", (cid,))
        with self._lock:
            self._loaded.pop(name, None)
        logger.info("collection {} deleted", name)

    # --- documents ------------------------------------------------------------------
    @_guarded
    def prepare(self, name: str, documents: Any) -> list[Document]:
        """Validate documents and split them into passages (no embedding yet)."""
        row = self._row(self._conn(), name)
        opts = CollectionOptions.from_dict(json.loads(row["options"]))
        return parse_documents(documents, opts)

    @_guarded
    def upsert(self, name: str, documents: Any, *, max_passages: int | None = None,
               max_tokens: int | None = None) -> dict:
        """Add or replace documents by id; returns ``{"ids": [...], "passages": n}``.

        Every passage is embedded (through the sidecar, in one batched call)
        before the write begins, so the store is locked only for the insert.
        ``max_passages`` and ``max_tokens`` are the caller's budget for the
        call (RequestTooLarge above either, before anything is embedded)."""
        docs = self.prepare(name, documents)  # at least one document, each of at least one passage
        passages = [p for d in docs for p in d.passages]
        if max_passages is not None and len(passages) > max_passages:
            raise RequestTooLarge(f"the documents make {len(passages)} passages, over the limit of {max_passages} "
                                  "per request (SHM_EMBED_MAX_INPUTS)", limit=max_passages, actual=len(passages),
                                  what="passages")
        if max_tokens is None:  # any object with embed() serves a store used as a library
            vectors = self.client.embed(passages, normalize=True)
        else:
            vectors = self.client.embed_detailed(passages, normalize=True, max_tokens=max_tokens).vectors
        return self.write_embedded(name, docs, vectors)

    @_guarded
    def write_embedded(self, name: str, docs: list[Document], vectors: np.ndarray) -> dict:
        """Store already-embedded documents (rows of ``vectors`` in passage order)."""
        model, dim = self.model()
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        expected = (sum(len(d.spans) for d in docs), dim)
        if vectors.shape != expected:
            raise InvalidInput(f"expected {expected[0]} vectors of {dim}, got {vectors.shape}")
        now = time.time()
        with self._write() as conn:
            row = self._row(conn, name)
            cid = row["cid"]
            i = 0
            for d in docs:
                _remove_document(conn, cid, d.id)
                conn.execute("INSERT INTO documents (cid, id, url, metadata, text, updated) VALUES (?, ?, ?, ?, ?, ?)",
                             (cid, d.id, d.url, json.dumps(d.metadata), d.text, now))
                for ordinal, (a, b) in enumerate(d.spans):
                    cur = conn.execute(
                        "INSERT INTO passages (cid, doc_id, ord, start, stop, vector) VALUES (?, ?, ?, ?, ?, ?)",
                        (cid, d.id, ordinal, a, b, vectors[i].tobytes()))
                    conn.execute(_LOG_CHANGE, (cid, OP_ADD, cur.lastrowid))
                    i += 1
            total = conn.execute("SELECT count(*) FROM passages WHERE cid = ?", (cid,)).fetchone()[0]
            trained = conn.execute("SELECT 1 FROM centroids WHERE cid = ?", (cid,)).fetchone() is not None
        if not trained:
            self._maybe_train(row, total)
        return {"ids": [d.id for d in docs], "passages": len(vectors)}

    @_guarded
    def delete_document(self, name: str, doc_id: str) -> None:
        with self._write() as conn:
            cid = self._row(conn, name, check_model=False)["cid"]
            if not _remove_document(conn, cid, doc_id):
                raise CollectionNotFound(f"collection {name!r} has no document {doc_id!r}")

    @_guarded
    def get_document(self, name: str, doc_id: str) -> dict:
        conn = self._conn()
        cid = self._row(conn, name, check_model=False)["cid"]
        row = conn.execute("SELECT id, url, metadata, text FROM documents WHERE cid = ? AND id = ?",
                           (cid, doc_id)).fetchone()
        if row is None:
            raise CollectionNotFound(f"collection {name!r} has no document {doc_id!r}")
        n = conn.execute("SELECT count(*) FROM passages WHERE cid = ? AND doc_id = ?", (cid, doc_id)).fetchone()[0]
        return {"id": row["id"], "url": row["url"], "metadata": json.loads(row["metadata"]), "text": row["text"],
                "passages": n}

    # --- the IVF quantizer -------------------------------------------------------------
    def _ivf_need(self, options: dict) -> int | None:
        """Passages at which a collection of these options trains its IVF quantizer (None: never)."""
        return {"auto": self.ivf_min_vectors, "ivf": IVF_EXPLICIT_MIN}.get(options["index"])

    def _maybe_train(self, row: sqlite3.Row, total: int) -> None:
        need = self._ivf_need(json.loads(row["options"]))
        if need is None or total < need:
            return
        if self.snapshots is not None:
            self.snapshots.request_build(row["cid"], "the IVF quantizer is due")  # trained there, not in a request
            return
        conn = self._conn()
        nlist = nlist_for(total)
        take = min(total, nlist * POINTS_PER_CENTROID)
        blobs = conn.execute("SELECT vector FROM passages WHERE cid = ? ORDER BY random() LIMIT ?",
                             (row["cid"], take)).fetchall()
        sample = np.frombuffer(b"".join(b[0] for b in blobs), dtype="<f4").reshape(-1, row["dim"])
        t0 = time.perf_counter()
        centroids = train_centroids(sample, nlist)
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO centroids (cid, nlist, data, trained_at) VALUES (?, ?, ?, ?)",
                         (row["cid"], len(centroids), centroids.astype("<f4").tobytes(), total))
        logger.info("collection {}: IVF quantizer of {} lists trained on {} passages in {:.1f} s",
                    row["name"], len(centroids), len(sample), time.perf_counter() - t0)

    # --- searching ---------------------------------------------------------------------
    @_guarded
    def warm(self) -> int:
        """Load the index of every collection of this model now (a worker
        calls it at start, so its first search of a big collection is not the
        one that waits for the load). Returns the passages loaded."""
        conn = self._conn()
        total = 0
        for (name,) in conn.execute("SELECT name FROM collections ORDER BY name").fetchall():
            try:
                total += self._sync(conn, self._row(conn, name)).index.ntotal
            except (CollectionNotFound, CollectionConflict):
                pass
        if self.snapshots is not None:
            self.snapshots.sweep()  # snapshots of collections deleted while this worker was away
        return total

    def _sync(self, conn: sqlite3.Connection, row: sqlite3.Row) -> _Loaded:
        """This process's index of the collection, brought up to the last committed write."""
        name, cid, dim = row["name"], row["cid"], row["dim"]
        with self._lock:
            lo = self._loaded.get(name)
            if lo is None or lo.cid != cid:
                lo = self._loaded[name] = _Loaded(cid, dim, self.nprobe)
        with lo.lock, reading(conn):  # one state: a compaction cannot slip between the floor and the replay
            last, floor = log_state(conn, cid)
            shared = self.snapshots is not None and self.snapshots.refresh(lo, floor, name)
            if not shared and lo.index.kind == "flat":
                cent = conn.execute("SELECT data FROM centroids WHERE cid = ?", (cid,)).fetchone()
                if cent is not None:
                    lo.index = PassageIndex(dim, np.frombuffer(cent[0], dtype="<f4").reshape(-1, dim),
                                            nprobe=self.nprobe)
                    lo.seq = 0
            if lo.seq < floor:  # the log no longer holds what this process missed: read the tables
                logger.info("collection {}: applied changes up to {}, the log starts after {}: loading from the "
                            "tables", name, lo.seq, floor)
                lo.index, lo.seq = load_from_tables(conn, cid, dim, self.nprobe)
            elif last > lo.seq:
                self._replay(conn, lo, last)
            if self.snapshots is not None:
                self.snapshots.after_sync(lo, json.loads(row["options"]))
        return lo

    def _replay(self, conn: sqlite3.Connection, lo: _Loaded, last: int) -> None:
        cur = conn.execute(
            "SELECT c.op, c.pid, p.vector FROM changes c LEFT JOIN passages p ON c.op = ? AND p.pid = c.pid "
            "WHERE c.cid = ? AND c.seq > ? AND c.seq <= ? ORDER BY c.seq", (OP_ADD, lo.cid, lo.seq, last))
        while True:
            rows = cur.fetchmany(_REPLAY_CHUNK)
            if not rows:
                break
            gone = np.array([r[1] for r in rows if r[0] == OP_DEL], dtype=np.int64)
            added = [r for r in rows if r[0] == OP_ADD and r[2] is not None]
            lo.index.remove(gone)
            if added:
                vecs = np.frombuffer(b"".join(r[2] for r in added), dtype="<f4").reshape(len(added), lo.dim)
                lo.index.add(np.array([r[1] for r in added], dtype=np.int64), vecs)
        lo.seq = last

    @_guarded
    def search(self, name: str, query: str, top_k: int = 10, filter: dict | None = None) -> list[dict]:
        """The ``top_k`` documents best matching ``query``, best first, each
        with its best passage: ``{"id", "score", "passage", "url", "metadata"}``.
        ``score`` is the cosine similarity of query and passage."""
        if not isinstance(query, str):
            raise InvalidInput("'query' must be a string")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput(f"'top_k' must be an integer from 1 to {MAX_TOP_K}")
        conn = self._conn()
        row = self._row(conn, name)
        qv = self.client.embed([query], normalize=True)[0]
        return self.search_vector(name, qv, top_k, filter, row=row)

    @_guarded
    def search_vector(self, name: str, qv: np.ndarray, top_k: int = 10, filter: dict | None = None, *,
                      row: sqlite3.Row | None = None) -> list[dict]:
        conn = self._conn()
        row = row if row is not None else self._row(conn, name)
        lo = self._sync(conn, row)
        allowed = self._filtered(conn, row["cid"], filter) if filter is not None else None
        limit = lo.index.ntotal if allowed is None else len(allowed)
        k = min(limit, top_k * 4 + 8)
        best: dict[str, tuple[float, int, int]] = {}
        while k > 0:
            with lo.lock:
                scores, ids = lo.index.search(qv, k, allowed)
            where = _by_pid(conn, ids)
            best.clear()
            for score, pid in zip(scores.tolist(), ids.tolist()):
                hit = where.get(pid)
                if hit is not None and hit[0] not in best:
                    best[hit[0]] = (score, hit[1], hit[2])
            if len(best) >= top_k or k >= limit:
                break
            k = min(limit, k * 4)
        chosen = sorted(best.items(), key=lambda kv: -kv[1][0])[:top_k]
        docs = {r["id"]: r for r in conn.execute(
            "SELECT id, url, metadata, text FROM documents WHERE cid = ? AND id IN (SELECT value FROM json_each(?))",
            (row["cid"], json.dumps([c[0] for c in chosen])))}
        out = []
        for doc_id, (score, a, b) in chosen:
            d = docs.get(doc_id)
            if d is None:  # deleted between the index search and this read
                continue
            out.append({"id": doc_id, "score": float(score), "passage": d["text"][a:b], "url": d["url"],
                        "metadata": json.loads(d["metadata"])})
        return out

    def _filtered(self, conn: sqlite3.Connection, cid: int, filter: Any) -> np.ndarray | None:
        """Passage ids of the documents whose metadata matches every key of
        ``filter`` (a value, or a list of accepted values).

        The SQL has the same depth and two parameters whatever the filter
        holds: each key's values go in as one JSON array (``IN (SELECT value
        FROM json_each(...))``, computed once per query) and the keys are
        ANDed as a balanced tree. One ``OR`` per value, as before, made
        SQLite refuse 1,000 values ("Expression tree is too large (maximum
        depth 1000)") and a chain of 1,000 keys would do the same."""
        if not isinstance(filter, dict):
            raise InvalidInput("'filter' must be an object of metadata keys and values")
        wanted = {key: want if isinstance(want, list) else [want] for key, want in filter.items()}
        total = sum(len(values) for values in wanted.values())
        if total > self.filter_max_values:
            raise InvalidInput(f"'filter' lists {total} values; at most {self.filter_max_values} are allowed "
                               "(SHM_EMBED_FILTER_MAX_VALUES)")
        clauses, lists = [], []
        for key, values in wanted.items():
            if not isinstance(key, str) or not _FILTER_KEY.fullmatch(key):
                raise InvalidInput(f"filter key {key!r}: letters, digits, '_', '-' and spaces only")
            if not values or not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
                raise InvalidInput(f"filter {key!r}: a string, number, boolean, null or a non-empty list of them")
            path = f"'$.\"{key}\"'"  # the key's characters need no escaping in SQL or in a JSON path
            alts = []
            given = [v for v in values if v is not None]
            if given:
                alts.append(f"json_extract(d.metadata, {path}) IN "
                            f"(SELECT value FROM json_each(?2, '$[{len(lists)}]'))")
                lists.append(given)
            if len(given) < len(values):
                alts.append(f"json_extract(d.metadata, {path}) IS NULL")
            clauses.append("(" + " OR ".join(alts) + ")")
        if not clauses:
            return None  # {}: no restriction
        params = [cid]
        if lists:
            try:
                params.append(json.dumps(lists, allow_nan=False))
            except ValueError:
                raise InvalidInput("'filter': NaN and infinite numbers are not allowed") from None
        sql = ("SELECT p.pid FROM passages p JOIN documents d ON d.cid = p.cid AND d.id = p.doc_id "
               "WHERE p.cid = ?1 AND " + _all_of(clauses))
        return np.array([r[0] for r in conn.execute(sql, params)], dtype=np.int64)


def _all_of(clauses: list[str]) -> str:
    """``clauses`` ANDed as a balanced tree: SQLite parses ``a AND b AND c ...``
    into a chain as deep as it is long and refuses depths over 1,000."""
    if len(clauses) == 1:
        return clauses[0]
    mid = len(clauses) // 2
    return f"({_all_of(clauses[:mid])} AND {_all_of(clauses[mid:])})"


def _remove_document(conn: sqlite3.Connection, cid: int, doc_id: str) -> bool:
    """Delete a document (its passages cascade) and log their removal; False if it was not there."""
    old = [(cid, OP_DEL, r[0]) for r in conn.execute("SELECT pid FROM passages WHERE cid = ? AND doc_id = ?",
                                                      (cid, doc_id))]
    conn.executemany(_LOG_CHANGE, old)
    return conn.execute("DELETE FROM documents WHERE cid = ? AND id = ?", (cid, doc_id)).rowcount > 0


def _by_pid(conn: sqlite3.Connection, ids: np.ndarray) -> dict[int, tuple[str, int, int]]:
    if not len(ids):
        return {}
    rows = conn.execute("SELECT pid, doc_id, start, stop FROM passages WHERE pid IN (SELECT value FROM json_each(?))",
                        (json.dumps(ids.tolist()),))
    return {r[0]: (r[1], r[2], r[3]) for r in rows}
