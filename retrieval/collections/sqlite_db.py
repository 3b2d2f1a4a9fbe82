"""The embedded collection store: one SQLite file shared by every worker of a host.

The database is ``collections.sqlite3`` under ``SHM_EMBED_DATA_DIR``, in WAL
mode with ``synchronous=FULL``: every write is one transaction (``BEGIN
IMMEDIATE``), so it is durable when it returns and a writer killed half-way
leaves the previous state; concurrent writers from many worker processes
queue on SQLite's one write lock, for ``busy_timeout_s`` at most
(StorageBusy after). That lock is also what orders the change log: a writer
holds it from its first statement to its commit, so sequence numbers
(``AUTOINCREMENT``) become visible in the order they were handed out. Each
thread of a process has its own connection. The files are private (see
:mod:`retrieval.collections.storage`, which also turns SQLite's failures into typed errors).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from loguru import logger

from shm_protocol.config import COLLECTIONS_DB
from shm_protocol.logs import RateLimitedLog

from ..errors import StorageBusy, StorageUnavailable
from .database import OP_ADD, OP_DEL, CollectionRow, Database, FilterKey, all_of
from .storage import NEWER, narrow_modes, os_storage_error, prepare_files, storage_error

DB_FILE = COLLECTIONS_DB
#: A read for /ready waits this long at most for a lock (a WAL reader only waits during recovery).
STATUS_BUSY_S = 0.5
_status_log = RateLimitedLog(60.0)
#: 1: collections, documents, passages, centroids, changes. 2: snapshot_marks and change_floor (the change
#: log may be compacted). Migrating is creating what is missing: every statement of SCHEMA is "IF NOT EXISTS".
SCHEMA_VERSION = 2
_LOG_CHANGE = "INSERT INTO changes (cid, op, pid) VALUES (?, ?, ?)"

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


def _json_kind(json_type: str) -> str:
    """SQL for the kind of JSON value that ``json_type`` (an SQL expression
    giving SQLite's json_type) names: numbers are one kind, as are booleans."""
    return (f"CASE {json_type} WHEN 'true' THEN 'boolean' WHEN 'false' THEN 'boolean' "
            f"WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' ELSE {json_type} END")


def _collection(row: sqlite3.Row | None) -> CollectionRow | None:
    if row is None:
        return None
    return CollectionRow(row["cid"], row["name"], row["model"], row["dim"], json.loads(row["options"]),
                         row["created"])


class SQLiteDatabase(Database):
    """``collections.sqlite3`` under ``data_dir``, created (with its schema) when opened."""

    kind = "sqlite"
    OPTIONS = ("busy_timeout_s",)

    def __init__(self, data_dir: str | os.PathLike, *, busy_timeout_s: float = 30.0):
        self.dir = Path(data_dir)
        self.path = self.dir / DB_FILE
        self.where = str(self.path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        try:
            conn = self._conn()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self.close()
                raise StorageUnavailable(f"collection store {self.path}: schema version {version}, this service "
                                         f"knows up to {SCHEMA_VERSION}", reason=NEWER[0], retry_after_s=NEWER[1])
            # One script, one transaction (executescript commits an open transaction before it runs).
            conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        except sqlite3.Error as exc:
            self.close()  # a script that failed half-way leaves its transaction, and the write lock, open
            typed = self.storage_error(exc, "opening")
            if typed is None:
                raise
            raise typed from None
        try:
            narrow_modes(self.path)  # the -wal and -shm files exist now
        except OSError as exc:
            raise os_storage_error(exc, self.path) from None

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
    def read(self):
        yield self._conn()  # autocommit: each statement reads the latest committed state

    @contextmanager
    def write(self):
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # SQLITE_BUSY after busy_timeout_s: StorageBusy
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
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()

    def storage_error(self, exc: BaseException, doing: str) -> Exception | None:
        if not isinstance(exc, sqlite3.Error):
            return None
        return storage_error(exc, self.path, doing)

    # --- collections ----------------------------------------------------------------
    def collection(self, conn, name: str, *, lock: bool = False) -> CollectionRow | None:
        # lock: a write transaction (BEGIN IMMEDIATE) already holds the database's one write lock.
        return _collection(conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone())

    def collection_names(self, conn) -> list[str]:
        return [r[0] for r in conn.execute("SELECT name FROM collections ORDER BY name")]

    def add_collection(self, conn, name: str, model: str, dim: int, options: dict, created: float) -> bool:
        cur = conn.execute("INSERT INTO collections (name, model, dim, options, created) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (name) DO NOTHING", (name, model, dim, json.dumps(options), created))
        return cur.rowcount > 0

    def drop_collection(self, conn, cid: int) -> None:
        conn.execute("DELETE FROM changes WHERE cid = ?", (cid,))
        conn.execute("DELETE FROM snapshot_marks WHERE cid = ?", (cid,))
        conn.execute("DELETE FROM change_floor WHERE cid = ?", (cid,))
        conn.execute("DELETE FROM collections WHERE cid = ?", (cid,))

    def counts(self, conn, cid: int) -> tuple[int, int]:
        docs = conn.execute("SELECT count(*) FROM documents WHERE cid = ?", (cid,)).fetchone()[0]
        return docs, self.passage_count(conn, cid)

    def nlist(self, conn, cid: int) -> int | None:
        row = conn.execute("SELECT nlist FROM centroids WHERE cid = ?", (cid,)).fetchone()
        return None if row is None else row[0]

    # --- documents ----------------------------------------------------------------------
    def document(self, conn, cid: int, doc_id: str) -> dict | None:
        row = conn.execute("SELECT id, url, metadata, text FROM documents WHERE cid = ? AND id = ?",
                           (cid, doc_id)).fetchone()
        if row is None:
            return None
        n = conn.execute("SELECT count(*) FROM passages WHERE cid = ? AND doc_id = ?", (cid, doc_id)).fetchone()[0]
        return {"id": row["id"], "url": row["url"], "metadata": json.loads(row["metadata"]), "text": row["text"],
                "passages": n}

    def remove_documents(self, conn, cid: int, doc_ids: list[str]) -> int:
        removed = 0
        for doc_id in doc_ids:
            old = [(cid, OP_DEL, r[0]) for r in conn.execute("SELECT pid FROM passages WHERE cid = ? AND doc_id = ?",
                                                              (cid, doc_id))]
            conn.executemany(_LOG_CHANGE, old)
            removed += conn.execute("DELETE FROM documents WHERE cid = ? AND id = ?", (cid, doc_id)).rowcount
        return removed

    def insert_documents(self, conn, cid: int, docs: list, vectors: np.ndarray, now: float) -> None:
        row = 0
        for doc in docs:
            conn.execute("INSERT INTO documents (cid, id, url, metadata, text, updated) VALUES (?, ?, ?, ?, ?, ?)",
                         (cid, doc.id, doc.url, json.dumps(doc.metadata), doc.text, now))
            for ordinal, (start, stop) in enumerate(doc.spans):
                cur = conn.execute(
                    "INSERT INTO passages (cid, doc_id, ord, start, stop, vector) VALUES (?, ?, ?, ?, ?, ?)",
                    (cid, doc.id, ordinal, start, stop, vectors[row].tobytes()))
                conn.execute(_LOG_CHANGE, (cid, OP_ADD, cur.lastrowid))
                row += 1

    def documents_by_id(self, conn, cid: int, doc_ids: list[str]) -> dict[str, tuple[str | None, dict, str]]:
        rows = conn.execute("SELECT id, url, metadata, text FROM documents "
                            "WHERE cid = ? AND id IN (SELECT value FROM json_each(?))", (cid, json.dumps(doc_ids)))
        return {r["id"]: (r["url"], json.loads(r["metadata"]), r["text"]) for r in rows}

    def passages_by_pid(self, conn, pids: np.ndarray) -> dict[int, tuple[str, int, int]]:
        if not len(pids):
            return {}
        rows = conn.execute("SELECT pid, doc_id, start, stop FROM passages "
                            "WHERE pid IN (SELECT value FROM json_each(?))", (json.dumps(pids.tolist()),))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def filtered_pids(self, conn, cid: int, keys: list[FilterKey]) -> np.ndarray:
        """The SQL has the same depth and two parameters whatever the filter
        holds: each key's values go in as one JSON array (``IN (SELECT value
        FROM json_each(...))``, computed once per query) and the keys are
        ANDed as a balanced tree. One ``OR`` per value, as before, made
        SQLite refuse 1,000 values ("Expression tree is too large (maximum
        depth 1000)") and a chain of 1,000 keys would do the same.

        Values compare as JSON, as PostgreSQL's ``jsonb`` compares them: a
        value and its JSON kind together (json_extract alone gives 1 for
        ``true`` and the text of an object), so ``true`` is not ``1``,
        ``"7"`` is not ``7``, and ``1.0`` is ``1``."""
        clauses, lists = [], []
        for fk in keys:
            path = f"'$.\"{fk.key}\"'"  # the store allows no character in a key that needs escaping here
            alts = []
            if fk.values:
                alts.append(f"(json_extract(d.metadata, {path}), {_json_kind(f'json_type(d.metadata, {path})')}) IN "
                            f"(SELECT value, {_json_kind('type')} FROM json_each(?2, '$[{len(lists)}]'))")
                lists.append(fk.values)
            if fk.null:
                alts.append(f"json_extract(d.metadata, {path}) IS NULL")
            clauses.append("(" + " OR ".join(alts) + ")")
        params = [cid]
        if lists:
            params.append(json.dumps(lists, allow_nan=False))
        sql = ("SELECT p.pid FROM passages p JOIN documents d ON d.cid = p.cid AND d.id = p.doc_id "
               "WHERE p.cid = ?1 AND " + all_of(clauses))
        return np.array([r[0] for r in conn.execute(sql, params)], dtype=np.int64)

    # --- the IVF quantizer ----------------------------------------------------------------
    def passage_count(self, conn, cid: int) -> int:
        return conn.execute("SELECT count(*) FROM passages WHERE cid = ?", (cid,)).fetchone()[0]

    def sample_vectors(self, conn, cid: int, n: int) -> bytes:
        rows = conn.execute("SELECT vector FROM passages WHERE cid = ? ORDER BY random() LIMIT ?", (cid, n))
        return b"".join(r[0] for r in rows)

    def centroids(self, conn, cid: int) -> tuple[int, bytes, int] | None:
        row = conn.execute("SELECT nlist, data, trained_at FROM centroids WHERE cid = ?", (cid,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def add_centroids(self, conn, cid: int, centroids: np.ndarray, trained_at: int) -> None:
        conn.execute("INSERT INTO centroids (cid, nlist, data, trained_at) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (cid) DO NOTHING",
                     (cid, len(centroids), np.ascontiguousarray(centroids, dtype="<f4").tobytes(), trained_at))

    # --- the change log -------------------------------------------------------------------------
    def last_seq(self, conn, cid: int) -> int:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM changes WHERE cid = ?", (cid,)).fetchone()[0]

    def changes(self, conn, cid: int, after: int, upto: int, limit: int) -> list[tuple[int, int, int, bytes | None]]:
        return [tuple(r) for r in conn.execute(
            "SELECT c.seq, c.op, c.pid, p.vector FROM changes c LEFT JOIN passages p ON c.op = ? AND p.pid = c.pid "
            "WHERE c.cid = ? AND c.seq > ? AND c.seq <= ? ORDER BY c.seq LIMIT ?",
            (OP_ADD, cid, after, upto, limit))]

    # --- snapshots ---------------------------------------------------------------------------------
    @contextmanager
    def consistent(self, conn, *, bulk: bool = False):  # SQLite sets no time limits on a read
        # A deferred transaction: its first read fixes the WAL snapshot every later read sees.
        conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")  # nothing was written: ending the read is all

    def log_state(self, conn, cid: int) -> tuple[int, int]:
        last, floor = conn.execute(
            "SELECT coalesce(max(seq), 0), (SELECT coalesce(max(seq), 0) FROM change_floor WHERE cid = ?1) "
            "FROM changes WHERE cid = ?1", (cid,)).fetchone()
        return int(last), int(floor)

    def collection_by_id(self, conn, cid: int) -> CollectionRow | None:
        return _collection(conn.execute("SELECT * FROM collections WHERE cid = ?", (cid,)).fetchone())

    def collection_ids(self, conn) -> set[int]:
        return {r[0] for r in conn.execute("SELECT cid FROM collections")}

    def stream_passages(self, conn, cid: int, chunk: int) -> Iterator[tuple[np.ndarray, bytes]]:
        # "+cid" keeps SQLite off the (cid, doc_id) index, which would sort every vector in a
        # temporary table; the table itself is in id order.
        cur = conn.execute("SELECT pid, vector FROM passages WHERE +cid = ? ORDER BY pid", (cid,))
        while rows := cur.fetchmany(chunk):
            yield np.fromiter((r[0] for r in rows), np.int64, len(rows)), b"".join(r[1] for r in rows)

    def replace_centroids(self, conn, cid: int, centroids: np.ndarray, trained_at: int) -> None:
        conn.execute("UPDATE centroids SET nlist = ?, data = ?, trained_at = ? WHERE cid = ?",
                     (len(centroids), np.ascontiguousarray(centroids, dtype="<f4").tobytes(), trained_at, cid))

    # One host uses a SQLite file: its clock is the only one.
    def mark_snapshot(self, conn, host: str, cid: int, seq: int) -> None:
        conn.execute("INSERT INTO snapshot_marks (host, cid, seq, updated) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (host, cid) DO UPDATE SET seq = excluded.seq, updated = excluded.updated",
                     (host, cid, seq, time.time()))

    def touch_mark(self, conn, host: str, cid: int) -> None:
        conn.execute("UPDATE snapshot_marks SET updated = ? WHERE host = ? AND cid = ?", (time.time(), host, cid))

    def covered_by_live_hosts(self, conn, cid: int, stale_s: float) -> int | None:
        return conn.execute("SELECT min(seq) FROM snapshot_marks WHERE cid = ? AND updated >= ?",
                            (cid, time.time() - stale_s)).fetchone()[0]

    def raise_floor(self, conn, cid: int, seq: int) -> None:
        conn.execute("INSERT INTO change_floor (cid, seq) VALUES (?, ?) "
                     "ON CONFLICT (cid) DO UPDATE SET seq = max(seq, excluded.seq)", (cid, seq))

    def delete_changes(self, conn, cid: int, upto: int, limit: int) -> int:
        return conn.execute("DELETE FROM changes WHERE seq IN (SELECT seq FROM changes WHERE cid = ? AND seq <= ? "
                            "LIMIT ?)", (cid, upto, limit)).rowcount


def store_status(db: Path) -> tuple[bool, str]:
    """(True, "ok") when the database can be read, or when there is none yet
    (it is made on the first use); (False, reason) otherwise. Reads a page or
    two: cheap enough for every /ready probe; never creates the file."""
    if not db.exists():
        return True, "ok"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=STATUS_BUSY_S, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        return False, _status_reason(exc, db)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(STATUS_BUSY_S * 1000)}")
        if conn.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
            return False, f"collection store unavailable: {NEWER[0]}"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "collections" in tables:
            conn.execute("SELECT count(*) FROM collections").fetchone()
        return True, "ok"
    except sqlite3.Error as exc:
        return False, _status_reason(exc, db)
    finally:
        conn.close()


def _status_reason(exc: sqlite3.Error, db: Path) -> str:
    _status_log("ERROR", "collection store {}: readiness check: {} ({})", db, exc,
                getattr(exc, "sqlite_errorname", type(exc).__name__))
    typed = storage_error(exc, db, log=False)
    if isinstance(typed, StorageUnavailable):
        return f"collection store unavailable: {typed.reason}"
    if isinstance(typed, StorageBusy):
        return "collection store is busy"
    return "collection store unavailable: the database cannot be read"
