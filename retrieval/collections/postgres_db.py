"""The shared collection store: PostgreSQL, for every worker of every host.

``SHM_EMBED_COLLECTIONS_URL=postgresql://user:password@host:5432/db`` puts the
tables of :mod:`retrieval.collections.sqlite_db` in PostgreSQL (vectors as ``bytea``;
metadata and options as ``json``, kept as written, like SQLite's text).
Workers on any number of hosts behind a load balancer then see the same
collections, and each replays the shared change log into its own FAISS
index before it searches, so a write through any host is found by the next
search on every host.

Connections. Each worker process has a small psycopg pool
(``SHM_EMBED_COLLECTIONS_POOL`` connections at most), opened on first use in
that process, after Gunicorn's fork: a pool found open under another process
id was inherited through a fork and is left untouched (closing its
connections would end the parent's sessions) while a new one is opened.
Connections run in autocommit, so a read sees the latest commit; a write is
one explicit transaction (``synchronous_commit`` as the server says, on by
default: durable when it returns). A request waits at most
``SHM_EMBED_COLLECTIONS_TIMEOUT_S`` for a connection, a statement runs
``STATEMENT_TIMEOUTS`` times that at most (``statement_timeout``, never below
the lock wait), and a client waits for any answer a little longer than that
(:class:`_Connection`; TCP keepalives and ``tcp_user_timeout`` are on as
well): a server that is frozen or cut off fails a request in bounded time.
A builder's long read and a collection's deletion go without those limits
(:meth:`PostgresDatabase.unbounded`). A server that is down,
restarting, full or refusing us is a typed StorageUnavailable (HTTP 503 with
Retry-After and a short reason: never the URL or its password, which only
ever appears in logs as ``***``). After a connection fails, the pool's idle
connections are checked at once, so those a server restart left dead are
dropped instead of failing one request each.

The change log. ``changes.seq`` comes from a sequence, and a sequence hands
out numbers in the order transactions ask, not the order they commit: with
two writers A (takes seq 10) and B (takes 11) where B commits first, a
worker that replayed up to 11 would never look at 10 again, and A's passages
would be missing from its index for good. So every write to a collection
first takes that collection's row lock (``SELECT ... FOR NO KEY UPDATE`` on
``collections``, held to the commit) and only then takes sequence numbers:
writers of one collection run one after the other, and a transaction's
numbers are taken after the previous writer committed and are larger than
all of its numbers. Once a worker sees a number, every smaller number of
that collection is committed (or was rolled back and never appears). This is
the same order SQLite's single write lock gives; writers of different
collections do not wait on each other, and readers never wait. (Reading only
up to ``pg_snapshot_xmin`` would let writers of one collection overlap, but
costs every search a snapshot query and leaves a reader stalled behind the
slowest open transaction of the whole database.)

The schema is created and migrated when a process first opens the store:
``MIGRATIONS`` are applied in order under a transaction-level advisory lock
(many workers on many hosts start at once), and ``shm_embed_schema`` records
the version. A database of a newer version than this code knows is refused.
pgvector is not used: FAISS in each worker searches, PostgreSQL only stores.

psycopg is imported here, at the top, and this module only when a store needs
it: two threads of a worker importing two of psycopg's modules at once (the
warm-up and a request) could see one half initialised; Python serialises the
import of this one module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
import psycopg_pool
from loguru import logger
from psycopg.conninfo import conninfo_to_dict

from shm_protocol.errors import ConfigError, InvalidInput
from shm_protocol.logs import RateLimitedLog

from ..errors import StorageBusy, StorageUnavailable
from .database import OP_ADD, OP_DEL, CollectionRow, Database, FilterKey, all_of, ambiguous_url, redact, url_secrets
from .storage import CANNOT_OPEN, CORRUPT, FULL, IO, NEWER

#: Reasons a client sees (after "collection store unavailable: "), with the Retry-After they suggest.
UNREACHABLE = ("the database server cannot be reached", 5)
RESTARTING = ("the database server is restarting", 5)
EXHAUSTED = ("the database server is out of resources", 5)
READ_ONLY = ("the database is read-only", 30)

#: SQLSTATEs of storage failures -> (reason, Retry-After s). Errors of the SQL itself are not here.
_REASONS = {
    "53100": (FULL, 30), "53000": EXHAUSTED, "53200": EXHAUSTED, "53300": EXHAUSTED, "53400": EXHAUSTED,
    "57P01": RESTARTING, "57P02": RESTARTING, "57P03": RESTARTING, "08000": UNREACHABLE, "08003": UNREACHABLE,
    "08006": UNREACHABLE, "08001": UNREACHABLE, "08004": UNREACHABLE, "25006": READ_ONLY,
    "XX001": (CORRUPT, 60), "XX002": (CORRUPT, 60), "58030": (IO, 5),
    "28000": (CANNOT_OPEN, 30), "28P01": (CANNOT_OPEN, 30), "3D000": (CANNOT_OPEN, 30), "42501": (CANNOT_OPEN, 30),
}
#: Waits that another writer or the server ended: the write may be tried again (StorageBusy, 503).
_BUSY = {"55P03": "another writer held the collection too long", "40001": "a conflicting write",
         "40P01": "a deadlock", "57014": "the statement was cancelled",
         # The server ended a session whose transaction stalled (a worker or builder stopped, swapped out):
         # the connection is gone, the pool drops it, and the request may be tried again.
         "25P03": "a transaction was left idle too long", "25P04": "a transaction ran too long"}

#: Schema changes, in order; the version of a database is how many it has had.
MIGRATIONS: tuple[str, ...] = (
    # 1: the tables of the SQLite store. Vectors are stored EXTERNAL: random floats do not compress,
    # so PostgreSQL need not try (it only would for rows over 2 kB: vectors of 512 dimensions and up).
    """
    CREATE TABLE collections (
        cid bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        model text NOT NULL,
        dim integer NOT NULL,
        options json NOT NULL,
        created double precision NOT NULL
    );
    CREATE TABLE documents (
        cid bigint NOT NULL REFERENCES collections(cid) ON DELETE CASCADE,
        id text NOT NULL,
        url text,
        metadata json NOT NULL,
        text text NOT NULL,
        updated double precision NOT NULL,
        PRIMARY KEY (cid, id)
    );
    CREATE TABLE passages (
        pid bigserial PRIMARY KEY,
        cid bigint NOT NULL,
        doc_id text NOT NULL,
        ord integer NOT NULL,
        start integer NOT NULL,
        stop integer NOT NULL,
        vector bytea NOT NULL,
        FOREIGN KEY (cid, doc_id) REFERENCES documents(cid, id) ON DELETE CASCADE
    );
    ALTER TABLE passages ALTER COLUMN vector SET STORAGE EXTERNAL;
    CREATE INDEX passages_by_doc ON passages (cid, doc_id);
    CREATE TABLE centroids (
        cid bigint PRIMARY KEY REFERENCES collections(cid) ON DELETE CASCADE,
        nlist integer NOT NULL,
        data bytea NOT NULL,
        trained_at bigint NOT NULL
    );
    ALTER TABLE centroids ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE changes (
        seq bigserial PRIMARY KEY,
        cid bigint NOT NULL,
        op smallint NOT NULL,
        pid bigint NOT NULL
    );
    CREATE INDEX changes_by_collection ON changes (cid, seq);
    """,
    # 2: index snapshots (retrieval.collections.snapshot_manager). The change log may now be compacted up
    # to change_floor: a service of version 1 would replay it from 0 and miss what was compacted, so it
    # must refuse this database (it does: the version is newer than it knows).
    """
    CREATE TABLE snapshot_marks (
        host text NOT NULL,
        cid bigint NOT NULL REFERENCES collections(cid) ON DELETE CASCADE,
        seq bigint NOT NULL,
        updated double precision NOT NULL,
        PRIMARY KEY (host, cid)
    );
    CREATE TABLE change_floor (
        cid bigint PRIMARY KEY REFERENCES collections(cid) ON DELETE CASCADE,
        seq bigint NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
#: The advisory lock that serialises migrations of one database (the bytes of "shm-embd").
MIGRATION_LOCK = 0x73686D2D656D6264
SCHEMA_TABLE = "shm_embed_schema"

#: A transaction left idle this long by a stopped worker is ended by the server (its locks with it).
IDLE_IN_TRANSACTION_S = 60
#: A statement runs at most this many times SHM_EMBED_COLLECTIONS_TIMEOUT_S (and never less than the
#: busy timeout plus it, so that a writer waiting for a collection's lock gets its own error first):
#: the server cancels it (57014, StorageBusy).
STATEMENT_TIMEOUTS = 4
#: TCP keepalive probes before a silent peer is declared dead (libpq's keepalives_count).
KEEPALIVE_PROBES = 3
#: Connections a pool keeps open while idle.
POOL_MIN = 1
#: libpq waits at least this long for a connection (its minimum).
CONNECT_TIMEOUT_MIN_S = 2
#: The /ready check's connection timeout.
STATUS_TIMEOUT_S = 2
APPLICATION_NAME = "shm-embed"

#: Pools inherited through a fork: kept referenced forever, so that the child never closes (or
#: garbage-collects, which closes) connections that belong to its parent's sessions.
_INHERITED: list = []
#: Connection failures repeat on every request while the server is down: logged once per interval.
_unreachable_log = RateLimitedLog(10.0)
_status_log = RateLimitedLog(60.0)
#: psycopg_pool reports each failed reconnection (every second or two while a server is down) through
#: the standard logging module, unformatted, on stderr; the store logs the failure itself, rate-limited.
#: An operator's own level for that logger is left alone.
_pool_log = logging.getLogger("psycopg.pool")
if _pool_log.level == logging.NOTSET:
    _pool_log.setLevel(logging.ERROR)


class _Scrubbed:
    """Removes a URL's password from text, in every form it has (libpq quotes
    parts of a URL it cannot parse; a server may quote a parameter)."""

    def __init__(self, url: str):
        self._secrets = url_secrets(url)

    def __call__(self, text: Any) -> str:
        text = str(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class NoAnswer(psycopg.OperationalError):
    """The server did not answer within the connection's deadline: it is frozen,
    or cut off in a way TCP did not report yet. The connection was closed."""


_WAIT_TIMEOUT = getattr(psycopg.errors, "_WaitTimeout", ())


class _Connection(psycopg.Connection):
    """A connection that waits at most ``answer_s`` seconds for each answer of the
    server (None: as long as it takes), then closes itself and raises NoAnswer.

    statement_timeout is the server's to enforce, and TCP keepalives and
    ``tcp_user_timeout`` only notice a peer whose kernel is gone: a server whose
    processes are stopped (SIGSTOP, a frozen VM's guest still acking) would hold a
    request forever without this deadline, set a little past statement_timeout."""

    answer_s: float | None = None

    def wait(self, gen, interval: float = 0.1, timeout: float | None = None):
        if timeout is not None or self.answer_s is None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.answer_s)
        except _WAIT_TIMEOUT:
            # Half-way through the protocol: the connection cannot be used again (the pool drops it).
            self.pgconn.finish()
            raise NoAnswer(f"no answer from the database server within {self.answer_s:g} s") from None


def classify(exc: BaseException) -> tuple[str, tuple[str, float] | str] | None:
    """("unavailable", (reason, retry_s)) or ("busy", why) for a failure of the
    storage; None for anything else (a mistake in the SQL, a constraint)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return "unavailable", UNREACHABLE
    if not isinstance(exc, psycopg.Error):
        return None
    state = getattr(exc, "sqlstate", None)
    if state in _BUSY:
        return "busy", _BUSY[state]
    if state in _REASONS:
        return "unavailable", _REASONS[state]
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return "unavailable", UNREACHABLE  # a refused or lost connection carries no SQLSTATE
    return None


#: The escape of a lone surrogate in JSON text (a high one not followed by a
#: low one, or a low one not after a high one), after an even number of
#: backslashes (so not an escaped backslash followed by "ud83d"); group 1
#: keeps those backslashes. An ARE of PostgreSQL.
_LONE_SURROGATE_ESCAPE = (r"(?<!\\)((?:\\\\)*)(?:\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
                          r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _contains_nul(value: Any) -> bool:
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return any(_contains_nul(v) for v in value)
    return isinstance(value, str) and "\x00" in value


class PostgresDatabase(Database):
    """The collections of a PostgreSQL database; schema migrated when opened."""

    kind = "postgresql"
    OPTIONS = ("busy_timeout_s", "pool_size", "timeout_s")

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, pool_size: int = 4, timeout_s: float = 5.0):
        self.url = url
        self.where = redact(url)
        self._scrub = _Scrubbed(url)
        if ambiguous_url(url):
            raise ConfigError(f"SHM_EMBED_COLLECTIONS_URL={self.where}: an '@' or '/' in the user name or password "
                              "must be percent-encoded (%40, %2F)")
        try:
            conninfo_to_dict(url)
        except Exception as exc:  # whatever libpq says, without the password
            raise ConfigError(f"SHM_EMBED_COLLECTIONS_URL={self.where}: not a PostgreSQL URL "
                              f"({self._scrub(exc).strip()})") from None
        self.busy_timeout_s, self.pool_size, self.timeout_s = busy_timeout_s, pool_size, timeout_s
        #: What a statement may take on the server, and how long a client waits for any answer.
        self.statement_timeout_s = max(STATEMENT_TIMEOUTS * timeout_s, busy_timeout_s + timeout_s)
        self.answer_s = self.statement_timeout_s + max(timeout_s, CONNECT_TIMEOUT_MIN_S)
        self._lock = threading.Lock()
        self._pool_obj = None
        self._pid = 0
        try:
            with self.read() as conn:
                self._migrate(conn)
        except BaseException as exc:
            self.close()
            typed = self.storage_error(exc, "opening")
            if typed is None:
                raise
            raise typed from None

    # --- connections and transactions ------------------------------------------
    def _configure(self, conn) -> None:
        """Session settings of every new connection: a writer waits ``busy_timeout_s`` at
        most for a collection's lock (StorageBusy after, as SQLite's busy timeout); a
        statement runs ``statement_timeout_s`` at most; the client waits ``answer_s`` at
        most for any answer (NoAnswer, StorageUnavailable after)."""
        conn.answer_s = self.answer_s
        conn.execute("SELECT set_config('lock_timeout', %s, false), "
                     "set_config('idle_in_transaction_session_timeout', %s, false), "
                     "set_config('statement_timeout', %s, false)",
                     (f"{int(self.busy_timeout_s * 1000)}ms", f"{IDLE_IN_TRANSACTION_S * 1000}ms",
                      f"{int(self.statement_timeout_s * 1000)}ms"))

    def _connect_kwargs(self) -> dict:
        """libpq's options of every connection: a connection timeout, and TCP keepalives and a
        user timeout, so that a server that went away without a word (a partition, a host that
        died) ends the connection instead of leaving it waiting for ever."""
        probe = max(1, math.ceil(self.timeout_s))
        return {"autocommit": True, "fallback_application_name": APPLICATION_NAME,
                "connect_timeout": max(CONNECT_TIMEOUT_MIN_S, math.ceil(self.timeout_s)),
                "keepalives": 1, "keepalives_idle": probe, "keepalives_interval": probe,
                "keepalives_count": KEEPALIVE_PROBES, "tcp_user_timeout": int(self.answer_s * 1000)}

    @contextmanager
    def unbounded(self, conn):
        """Inside a transaction on ``conn``: no statement, idle-in-transaction or answer
        limit until it ends (a builder's read of every passage, a big collection's
        deletion). A lost server is still noticed by TCP keepalives and the user timeout."""
        conn.execute("SELECT set_config('statement_timeout', '0', true), "
                     "set_config('idle_in_transaction_session_timeout', '0', true)")
        answer_s, conn.answer_s = conn.answer_s, None
        try:
            yield
        finally:
            conn.answer_s = answer_s

    def _pool(self):
        with self._lock:
            if self._pool_obj is not None and self._pid != os.getpid():
                _INHERITED.append(self._pool_obj)
                self._pool_obj = None
                logger.warning("collection store {}: connection pool inherited through a fork; this process "
                               "opens its own", self.where)
            if self._pool_obj is None:
                pool = psycopg_pool.ConnectionPool(
                    self.url, min_size=POOL_MIN, max_size=max(POOL_MIN, self.pool_size), open=False,
                    timeout=self.timeout_s, name=f"shm-embed-{os.getpid()}", configure=self._configure,
                    connection_class=_Connection,
                    # A pool gives up reconnecting after this and starts afresh on the next request,
                    # instead of backing off for minutes after the server is back.
                    reconnect_timeout=self.timeout_s, kwargs=self._connect_kwargs())
                pool.open(wait=False)
                self._pool_obj, self._pid = pool, os.getpid()
            return self._pool_obj

    @contextmanager
    def _connection(self):
        pool = self._pool()
        try:
            with pool.connection() as conn:
                yield conn
        except BaseException as exc:
            kind = classify(exc)
            # After no answer at all the server is frozen: checking the idle connections would wait as long.
            if kind is not None and kind[0] == "unavailable" and not isinstance(exc, NoAnswer):
                self._drop_dead(pool)
            raise

    def _drop_dead(self, pool) -> None:
        """Check the pool's idle connections now: after a server restart they are all dead."""
        try:
            pool.check()
        except Exception as exc:  # the request fails with its own error anyway
            logger.debug("collection store {}: pool check failed: {}", self.where, self._scrub(exc))

    @contextmanager
    def read(self):
        with self._connection() as conn:
            yield conn

    @contextmanager
    def write(self):
        with self._connection() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        with self._lock:
            pool, self._pool_obj = self._pool_obj, None
        if pool is not None and self._pid == os.getpid():
            pool.close()

    def storage_error(self, exc: BaseException, doing: str) -> Exception | None:
        kind = classify(exc)
        if kind is None:
            return None
        detail = self._scrub(exc).strip()
        state = getattr(exc, "sqlstate", None) or type(exc).__name__
        if kind[0] == "busy":
            return StorageBusy(f"collection store is busy: {kind[1]}")
        reason, retry = kind[1]
        if reason == UNREACHABLE[0] or reason == RESTARTING[0]:
            _unreachable_log("ERROR", "collection store {}: {}{} ({})", self.where, f"{doing}: " if doing else "",
                             detail, state)
        else:
            logger.error("collection store {}: {}{} ({})", self.where, f"{doing}: " if doing else "", detail, state)
        return StorageUnavailable(f"collection store {self.where}: {detail}", reason=reason, retry_after_s=retry)

    def check_documents(self, docs: list) -> None:
        for i, d in enumerate(docs):
            for field in ("id", "text", "url", "metadata"):
                if _contains_nul(getattr(d, field)):
                    raise InvalidInput(f"documents[{i}].{field} holds the character U+0000, which this "
                                       "collection store (PostgreSQL) cannot store")

    # --- the schema -----------------------------------------------------------------
    def _version(self, conn) -> int:
        if conn.execute("SELECT to_regclass(%s)", (SCHEMA_TABLE,)).fetchone()[0] is None:
            return 0
        return conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}").fetchone()[0]

    def _migrate(self, conn) -> None:
        if self._version(conn) == SCHEMA_VERSION:
            return  # the common case: no lock, no DDL
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version integer PRIMARY KEY, "
                         "applied timestamptz NOT NULL DEFAULT now())")
            have = self._version(conn)
            if have > SCHEMA_VERSION:
                raise StorageUnavailable(
                    f"collection store {self.where}: schema version {have}, this service knows up to "
                    f"{SCHEMA_VERSION}", reason=NEWER[0], retry_after_s=NEWER[1])
            for version in range(have + 1, SCHEMA_VERSION + 1):
                conn.execute(MIGRATIONS[version - 1])
                conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (%s)", (version,))
                logger.info("collection store {}: schema migrated to version {}", self.where, version)

    # --- collections ----------------------------------------------------------------
    def collection(self, conn, name: str, *, lock: bool = False) -> CollectionRow | None:
        # FOR NO KEY UPDATE: writers of one collection queue here (see the module's docstring);
        # the foreign keys of documents and centroids only need KEY SHARE, which it lets through.
        row = conn.execute("SELECT cid, name, model, dim, options, created FROM collections WHERE name = %s"
                           + (" FOR NO KEY UPDATE" if lock else ""), (name,)).fetchone()
        return None if row is None else CollectionRow(*row)

    def collection_names(self, conn) -> list[str]:
        return [r[0] for r in conn.execute("SELECT name FROM collections ORDER BY name")]

    def add_collection(self, conn, name: str, model: str, dim: int, options: dict, created: float) -> bool:
        cur = conn.execute("INSERT INTO collections (name, model, dim, options, created) "
                           "VALUES (%s, %s, %s, %s::json, %s) ON CONFLICT (name) DO NOTHING",
                           (name, model, dim, json.dumps(options), created))
        return cur.rowcount > 0

    def drop_collection(self, conn, cid: int) -> None:
        conn.execute("SELECT 1 FROM collections WHERE cid = %s FOR UPDATE", (cid,))
        # Deleting millions of passages may take longer than a statement may: no limits for the
        # deletes (the row lock above was taken within them).
        with self.unbounded(conn):
            conn.execute("DELETE FROM changes WHERE cid = %s", (cid,))
            conn.execute("DELETE FROM snapshot_marks WHERE cid = %s", (cid,))
            conn.execute("DELETE FROM change_floor WHERE cid = %s", (cid,))
            conn.execute("DELETE FROM collections WHERE cid = %s", (cid,))

    def counts(self, conn, cid: int) -> tuple[int, int]:
        row = conn.execute("SELECT (SELECT count(*) FROM documents WHERE cid = %(cid)s), "
                           "(SELECT count(*) FROM passages WHERE cid = %(cid)s)", {"cid": cid}).fetchone()
        return row[0], row[1]

    def nlist(self, conn, cid: int) -> int | None:
        row = conn.execute("SELECT nlist FROM centroids WHERE cid = %s", (cid,)).fetchone()
        return None if row is None else row[0]

    # --- documents ----------------------------------------------------------------------
    def document(self, conn, cid: int, doc_id: str) -> dict | None:
        if "\x00" in doc_id:
            return None  # cannot be stored, so it is not there
        row = conn.execute("SELECT id, url, metadata, text, (SELECT count(*) FROM passages p "
                           "WHERE p.cid = d.cid AND p.doc_id = d.id) FROM documents d WHERE cid = %s AND id = %s",
                           (cid, doc_id)).fetchone()
        if row is None:
            return None
        return {"id": row[0], "url": row[1], "metadata": row[2], "text": row[3], "passages": row[4]}

    def remove_documents(self, conn, cid: int, doc_ids: list[str]) -> int:
        doc_ids = [d for d in doc_ids if "\x00" not in d]
        if not doc_ids:
            return 0
        conn.execute("WITH gone AS (DELETE FROM passages WHERE cid = %(cid)s AND doc_id = ANY(%(ids)s) RETURNING pid) "
                     "INSERT INTO changes (cid, op, pid) SELECT %(cid)s, %(op)s, pid FROM gone ORDER BY pid",
                     {"cid": cid, "ids": doc_ids, "op": OP_DEL})
        return conn.execute("DELETE FROM documents WHERE cid = %s AND id = ANY(%s)", (cid, doc_ids)).rowcount

    def insert_documents(self, conn, cid: int, docs: list, vectors: np.ndarray, now: float) -> None:
        """Four round trips whatever the batch holds: the passage ids, then COPY of the
        documents and of the passages, then their change-log entries."""
        n_passages = len(vectors)
        pids = [r[0] for r in conn.execute("SELECT nextval('passages_pid_seq') FROM generate_series(1, %s)",
                                           (n_passages,))]
        with conn.cursor() as cur:
            with cur.copy("COPY documents (cid, id, url, metadata, text, updated) FROM STDIN") as copy:
                for doc in docs:
                    copy.write_row((cid, doc.id, doc.url, json.dumps(doc.metadata), doc.text, now))
            with cur.copy("COPY passages (pid, cid, doc_id, ord, start, stop, vector) FROM STDIN (FORMAT BINARY)"
                          ) as copy:
                copy.set_types(["int8", "int8", "text", "int4", "int4", "int4", "bytea"])
                row = 0
                for doc in docs:
                    for ordinal, (start, stop) in enumerate(doc.spans):
                        copy.write_row((pids[row], cid, doc.id, ordinal, start, stop, vectors[row].tobytes()))
                        row += 1
            cur.execute("INSERT INTO changes (cid, op, pid) SELECT %s, %s, unnest(%s::bigint[])", (cid, OP_ADD, pids))

    def documents_by_id(self, conn, cid: int, doc_ids: list[str]) -> dict[str, tuple[str | None, dict, str]]:
        rows = conn.execute("SELECT id, url, metadata, text FROM documents WHERE cid = %s AND id = ANY(%s)",
                            (cid, doc_ids))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def passages_by_pid(self, conn, pids: np.ndarray) -> dict[int, tuple[str, int, int]]:
        if not len(pids):
            return {}
        rows = conn.execute("SELECT pid, doc_id, start, stop FROM passages WHERE pid = ANY(%s::bigint[])",
                            (pids.tolist(),))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def filtered_pids(self, conn, cid: int, keys: list[FilterKey]) -> np.ndarray:
        """As SQLite's: one parameter holds every key's values (one JSON array
        each, expanded once per query) and the keys are ANDed as a balanced
        tree. Values compare as JSON (as ``jsonb``): ``true`` is not ``1``,
        ``"7"`` is not ``7``, ``1.0`` is ``1``.

        Metadata holding half a character (stored before text was checked)
        is read with U+FFFD in its place, as answers show it: PostgreSQL's
        JSON operators refuse a lone surrogate's escape, and such a row
        failed every filtered search of its collection."""
        params: dict[str, Any] = {"cid": cid}
        clauses, lists = [], []
        for i, fk in enumerate(keys):
            params[f"k{i}"] = fk.key
            alts = []
            if fk.values:
                alts.append(f"(m.metadata -> %(k{i})s::text)::jsonb IN "
                            f"(SELECT jsonb_array_elements(%(lists)s::jsonb -> {len(lists)}))")
                lists.append(fk.values)
            if fk.null:
                alts.append(f"coalesce(json_typeof(m.metadata -> %(k{i})s::text), 'null') = 'null'")
            clauses.append("(" + " OR ".join(alts) + ")")
        params["lists"] = json.dumps(lists, allow_nan=False)
        params["lone"], params["mended"] = _LONE_SURROGATE_ESCAPE, r"\1\\ufffd"  # \\ is one backslash here
        sql = ("SELECT p.pid FROM passages p JOIN documents d ON d.cid = p.cid AND d.id = p.doc_id "
               "CROSS JOIN LATERAL (SELECT CASE WHEN strpos(d.metadata::text, '\\u') = 0 THEN d.metadata "
               "WHEN d.metadata::text !~ %(lone)s THEN d.metadata "
               "ELSE regexp_replace(d.metadata::text, %(lone)s, %(mended)s, 'g')::json END AS metadata) m "
               "WHERE p.cid = %(cid)s AND " + all_of(clauses))
        return np.array([r[0] for r in conn.execute(sql, params)], dtype=np.int64)

    # --- the IVF quantizer ----------------------------------------------------------------
    def passage_count(self, conn, cid: int) -> int:
        return conn.execute("SELECT count(*) FROM passages WHERE cid = %s", (cid,)).fetchone()[0]

    def sample_vectors(self, conn, cid: int, n: int) -> bytes:
        rows = conn.execute("SELECT vector FROM passages WHERE cid = %s ORDER BY random() LIMIT %s", (cid, n))
        return b"".join(r[0] for r in rows)

    def centroids(self, conn, cid: int) -> tuple[int, bytes, int] | None:
        row = conn.execute("SELECT nlist, data, trained_at FROM centroids WHERE cid = %s", (cid,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def add_centroids(self, conn, cid: int, centroids: np.ndarray, trained_at: int) -> None:
        conn.execute("INSERT INTO centroids (cid, nlist, data, trained_at) VALUES (%s, %s, %s, %s) "
                     "ON CONFLICT (cid) DO NOTHING",
                     (cid, len(centroids), np.ascontiguousarray(centroids, dtype="<f4").tobytes(), trained_at))

    # --- the change log -------------------------------------------------------------------------
    def last_seq(self, conn, cid: int) -> int:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM changes WHERE cid = %s", (cid,)).fetchone()[0]

    def changes(self, conn, cid: int, after: int, upto: int, limit: int) -> list[tuple[int, int, int, bytes | None]]:
        return conn.execute(
            "SELECT c.seq, c.op, c.pid, p.vector FROM changes c LEFT JOIN passages p ON c.op = %s AND p.pid = c.pid "
            "WHERE c.cid = %s AND c.seq > %s AND c.seq <= %s ORDER BY c.seq LIMIT %s",
            (OP_ADD, cid, after, upto, limit)).fetchall()

    # --- snapshots ---------------------------------------------------------------------------------
    @contextmanager
    def consistent(self, conn, *, bulk: bool = False):
        # REPEATABLE READ: one snapshot of the database for the whole transaction (READ COMMITTED
        # takes one per statement). Started by hand on the autocommit connection: one round trip.
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        try:
            if bulk:
                with self.unbounded(conn):
                    yield
            else:
                yield
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                try:
                    conn.execute("ROLLBACK")  # nothing was written: ending the read is all
                except psycopg.Error:
                    pass  # a broken connection: the pool drops it

    def log_state(self, conn, cid: int) -> tuple[int, int]:
        row = conn.execute("SELECT (SELECT coalesce(max(seq), 0) FROM changes WHERE cid = %(cid)s), "
                           "(SELECT coalesce(max(seq), 0) FROM change_floor WHERE cid = %(cid)s)",
                           {"cid": cid}).fetchone()
        return int(row[0]), int(row[1])

    def collection_by_id(self, conn, cid: int) -> CollectionRow | None:
        row = conn.execute("SELECT cid, name, model, dim, options, created FROM collections WHERE cid = %s",
                           (cid,)).fetchone()
        return None if row is None else CollectionRow(*row)

    def collection_ids(self, conn) -> set[int]:
        return {r[0] for r in conn.execute("SELECT cid FROM collections")}

    def stream_passages(self, conn, cid: int, chunk: int) -> Iterator[tuple[np.ndarray, bytes]]:
        # A server-side cursor (it needs the transaction of consistent()): the rows come ``chunk`` at a time.
        with conn.cursor(name="shm_embed_passages", binary=True) as cur:
            cur.itersize = chunk
            cur.execute("SELECT pid, vector FROM passages WHERE cid = %s ORDER BY pid", (cid,))
            while rows := cur.fetchmany(chunk):
                yield np.fromiter((r[0] for r in rows), np.int64, len(rows)), b"".join(r[1] for r in rows)

    def replace_centroids(self, conn, cid: int, centroids: np.ndarray, trained_at: int) -> None:
        conn.execute("UPDATE centroids SET nlist = %s, data = %s, trained_at = %s WHERE cid = %s",
                     (len(centroids), np.ascontiguousarray(centroids, dtype="<f4").tobytes(), trained_at, cid))

    # Times are the server's: hosts whose clocks disagree still compare marks of one clock.
    def mark_snapshot(self, conn, host: str, cid: int, seq: int) -> None:
        conn.execute("INSERT INTO snapshot_marks (host, cid, seq, updated) "
                     "VALUES (%s, %s, %s, extract(epoch FROM clock_timestamp())) "
                     "ON CONFLICT (host, cid) DO UPDATE SET seq = excluded.seq, updated = excluded.updated",
                     (host, cid, seq))

    def touch_mark(self, conn, host: str, cid: int) -> None:
        conn.execute("UPDATE snapshot_marks SET updated = extract(epoch FROM clock_timestamp()) "
                     "WHERE host = %s AND cid = %s", (host, cid))

    def covered_by_live_hosts(self, conn, cid: int, stale_s: float) -> int | None:
        return conn.execute("SELECT min(seq) FROM snapshot_marks WHERE cid = %s "
                            "AND updated >= extract(epoch FROM clock_timestamp()) - %s",
                            (cid, stale_s)).fetchone()[0]

    def raise_floor(self, conn, cid: int, seq: int) -> None:
        # greatest(): two hosts' builders compacting at once never lower it.
        conn.execute("INSERT INTO change_floor (cid, seq) VALUES (%s, %s) "
                     "ON CONFLICT (cid) DO UPDATE SET seq = greatest(change_floor.seq, excluded.seq)", (cid, seq))

    def delete_changes(self, conn, cid: int, upto: int, limit: int) -> int:
        return conn.execute("DELETE FROM changes WHERE seq IN (SELECT seq FROM changes WHERE cid = %s "
                            "AND seq <= %s LIMIT %s)", (cid, upto, limit)).rowcount


def store_status(url: str) -> tuple[bool, str]:
    """(True, "ok") when the server answers and its schema (if made yet) is one
    this service knows; (False, reason) otherwise. One short connection of its
    own (never the workers' pools), a query or two; creates nothing."""
    scrub = _Scrubbed(url)
    if ambiguous_url(url):
        return False, "collection store unavailable: the database cannot be read"
    try:
        with _Connection.connect(url, connect_timeout=STATUS_TIMEOUT_S, autocommit=True,
                                 fallback_application_name=APPLICATION_NAME, keepalives=1,
                                 tcp_user_timeout=STATUS_TIMEOUT_S * 2000) as conn:
            conn.answer_s = STATUS_TIMEOUT_S * 2  # a frozen server: not ready, rather than a /ready that hangs
            if conn.execute("SELECT to_regclass(%s)", (SCHEMA_TABLE,)).fetchone()[0] is not None:
                version = conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}").fetchone()[0]
                if version > SCHEMA_VERSION:
                    return False, f"collection store unavailable: {NEWER[0]}"
        return True, "ok"
    except Exception as exc:  # every failure is a reason to be not ready
        kind = classify(exc)
        _status_log("ERROR", "collection store {}: readiness check: {} ({})", redact(url), scrub(exc).strip(),
                    getattr(exc, "sqlstate", None) or type(exc).__name__)
        if kind is not None and kind[0] == "unavailable":
            return False, f"collection store unavailable: {kind[1][0]}"
        if kind is not None:
            return False, "collection store is busy"
        return False, "collection store unavailable: the database cannot be read"
