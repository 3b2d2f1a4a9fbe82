"""Where collections are kept: the SQL side of :class:`retrieval.collections.store.CollectionStore`.

Two stores hold the same tables (``collections``, ``documents``, ``passages``
with their vectors as little-endian float32 bytes, ``centroids`` and the
change log ``changes``) and keep the same promises (a write is one
transaction, durable when it returns; a writer killed half-way leaves the
previous state):

- :class:`retrieval.collections.sqlite_db.SQLiteDatabase`, one file under
  ``SHM_EMBED_DATA_DIR`` that every worker of one host shares: the embedded
  default;
- :class:`retrieval.collections.postgres_db.PostgresDatabase`, a PostgreSQL server that
  the workers of every host share (``SHM_EMBED_COLLECTIONS_URL``).

:class:`Database` is what the store asks of either: connections and
transactions, and one small method per statement it needs, each taking the
connection its caller holds (so that a caller decides what runs in one
transaction). Everything above it (names, options, filters, FAISS, replaying
the change log) is the store's and is the same for both.

The change log is what keeps every worker's FAISS index current: each write
appends one ``(seq, cid, op, pid)`` row per passage added (``OP_ADD``) or
removed (``OP_DEL``), in the write's transaction, and a worker replays the
rows of a collection past the last ``seq`` it has applied. That only works if,
within a collection, a ``seq`` becomes visible only after every smaller one of
that collection has: each store says how it guarantees it.

Index snapshots (:mod:`retrieval.collections.snapshot_manager`) add two tables to both stores:
``snapshot_marks(host, cid, seq, updated)``, the changes each host's newest
snapshot of a collection covers and when the host last said so, and
``change_floor(cid, seq)``, up to where a collection's change log was
compacted away. Both go with their collection. A database that has them is of
a newer schema version than one that does not, so that a service that knows
nothing of the floor refuses it instead of replaying a log with a hole.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

OP_ADD, OP_DEL = 1, 2

#: The URL schemes that select the PostgreSQL store.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class CollectionRow:
    """One row of ``collections``."""

    cid: int
    name: str
    model: str
    dim: int
    options: dict
    created: float


@dataclass(frozen=True)
class FilterKey:
    """One key of a search filter, checked by the store: the metadata key,
    the non-null values it accepts, and whether a null (or a missing key) matches."""

    key: str
    values: list
    null: bool


class Database:
    """The SQL a collection store runs, over one kind of database.

    ``read()`` gives a connection for statements that each see the latest
    committed state (no transaction around them); ``write()`` gives one
    inside a transaction that commits when the block ends and rolls back if
    it raises. A connection is the caller's for the block only.
    """

    #: "sqlite" or "postgresql".
    kind: str = ""
    #: Where the data is, for logs and messages: a path, or a URL without its password.
    where: str = ""

    # --- connections ------------------------------------------------------------
    def read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def storage_error(self, exc: BaseException, doing: str) -> Exception | None:
        """The typed error (StorageUnavailable, StorageBusy...) for a failure of
        the storage, logged with its details; None when ``exc`` is not one."""
        raise NotImplementedError

    def check_documents(self, docs: list) -> None:
        """Raise InvalidInput for documents this database cannot store (before any write)."""

    # --- collections ----------------------------------------------------------------
    def collection(self, conn, name: str, *, lock: bool = False) -> CollectionRow | None:
        """The collection named ``name``. ``lock`` (inside ``write()`` only): hold
        the collection's write lock until the transaction ends, which orders
        this transaction's change-log entries after every earlier write's."""
        raise NotImplementedError

    def collection_names(self, conn) -> list[str]:
        raise NotImplementedError

    def add_collection(self, conn, name: str, model: str, dim: int, options: dict, created: float) -> bool:
        """Insert a collection unless one of that name exists; whether it was inserted."""
        raise NotImplementedError

    def drop_collection(self, conn, cid: int) -> None:
        """Delete a collection, everything of it and its change log."""
        raise NotImplementedError

    def counts(self, conn, cid: int) -> tuple[int, int]:
        """(documents, passages) of a collection."""
        raise NotImplementedError

    def nlist(self, conn, cid: int) -> int | None:
        """Inverted lists of a collection's IVF quantizer, or None (not trained)."""
        raise NotImplementedError

    # --- documents ----------------------------------------------------------------------
    def document(self, conn, cid: int, doc_id: str) -> dict | None:
        """``{"id", "url", "metadata", "text", "passages"}`` of one document, or None."""
        raise NotImplementedError

    def remove_documents(self, conn, cid: int, doc_ids: list[str]) -> int:
        """Delete documents (their passages go with them) and log each passage's
        removal; returns how many of the documents were there."""
        raise NotImplementedError

    def insert_documents(self, conn, cid: int, docs: list, vectors: np.ndarray, now: float) -> None:
        """Insert documents (none of them present) and their passages, whose
        vectors are the rows of ``vectors`` in order, and log each passage's addition."""
        raise NotImplementedError

    def documents_by_id(self, conn, cid: int, doc_ids: list[str]) -> dict[str, tuple[str | None, dict, str]]:
        """``{id: (url, metadata, text)}`` of those of ``doc_ids`` that exist."""
        raise NotImplementedError

    def passages_by_pid(self, conn, pids: np.ndarray) -> dict[int, tuple[str, int, int]]:
        """``{pid: (doc_id, start, stop)}`` of those of ``pids`` that exist."""
        raise NotImplementedError

    def filtered_pids(self, conn, cid: int, keys: list[FilterKey]) -> np.ndarray:
        """Passage ids of the documents whose metadata matches every key."""
        raise NotImplementedError

    # --- the IVF quantizer ----------------------------------------------------------------
    def passage_count(self, conn, cid: int) -> int:
        raise NotImplementedError

    def sample_vectors(self, conn, cid: int, n: int) -> bytes:
        """The vectors of ``n`` random passages of a collection, concatenated."""
        raise NotImplementedError

    def centroids(self, conn, cid: int) -> tuple[int, bytes, int] | None:
        """(nlist, float32 bytes, the passages it was trained on) of a
        collection's IVF quantizer, or None (not trained)."""
        raise NotImplementedError

    def add_centroids(self, conn, cid: int, centroids: np.ndarray, trained_at: int) -> None:
        """Store a quantizer unless the collection has one already (another worker trained it first)."""
        raise NotImplementedError

    # --- the change log -------------------------------------------------------------------------
    def last_seq(self, conn, cid: int) -> int:
        """The highest sequence number of a collection's change log (0 when empty)."""
        raise NotImplementedError

    def changes(self, conn, cid: int, after: int, upto: int, limit: int) -> list[tuple[int, int, int, bytes | None]]:
        """Up to ``limit`` entries ``(seq, op, pid, vector)`` of a collection's
        change log with ``after < seq <= upto``, in ``seq`` order. ``vector`` is
        the passage's for an addition whose passage still exists, else None."""
        raise NotImplementedError

    # --- snapshots: consistent reads, builds, marks and compaction (retrieval.collections.snapshot_manager) ---------
    def consistent(self, conn, *, bulk: bool = False) -> AbstractContextManager[None]:
        """One read-only transaction on ``conn`` (a connection of ``read()``):
        every statement inside sees the same committed state while writers go
        on. A worker reads the log's floor and replays the log inside one, so
        that a compaction cannot slip between the two; a builder reads the
        passages and the sequence number they are at inside one (``bulk``: as
        long as that takes, without the time limits of a request's statements
        and transactions). Never a write inside it."""
        raise NotImplementedError

    def log_state(self, conn, cid: int) -> tuple[int, int]:
        """(the highest sequence number of a collection's change log, the
        floor up to which its changes were compacted away); 0 for none."""
        raise NotImplementedError

    def collection_by_id(self, conn, cid: int) -> CollectionRow | None:
        raise NotImplementedError

    def collection_ids(self, conn) -> set[int]:
        """The ids of every collection (the snapshot folders of others are removed)."""
        raise NotImplementedError

    def stream_passages(self, conn, cid: int, chunk: int) -> Iterator[tuple[np.ndarray, bytes]]:
        """``(ids, their vectors concatenated)`` of every passage of a
        collection, in id order, ``chunk`` passages at a time, without holding
        them all in memory. Only inside :meth:`consistent`."""
        raise NotImplementedError

    def replace_centroids(self, conn, cid: int, centroids: np.ndarray, trained_at: int) -> None:
        """Replace a collection's quantizer with ones refitted on ``trained_at`` passages."""
        raise NotImplementedError

    def mark_snapshot(self, conn, host: str, cid: int, seq: int) -> None:
        """Record that ``host``'s newest snapshot of a collection covers its
        changes up to ``seq``, and that the host is alive now (by this
        database's clock: the hosts of one database compare times of one clock)."""
        raise NotImplementedError

    def touch_mark(self, conn, host: str, cid: int) -> None:
        """Say that ``host`` is alive now and still serves its mark (its seq stays)."""
        raise NotImplementedError

    def covered_by_live_hosts(self, conn, cid: int, stale_s: float) -> int | None:
        """The smallest mark of a collection among the hosts that recorded or
        touched theirs within the last ``stale_s`` seconds (None: no such
        host): the changes up to it are in every live host's snapshot."""
        raise NotImplementedError

    def raise_floor(self, conn, cid: int, seq: int) -> None:
        """Say that a collection's changes up to ``seq`` may be gone (never lowers it).
        Committed before those changes are deleted: a reader that misses them sees the floor."""
        raise NotImplementedError

    def delete_changes(self, conn, cid: int, upto: int, limit: int) -> int:
        """Delete up to ``limit`` of a collection's changes with ``seq <= upto``; returns how many."""
        raise NotImplementedError


def all_of(clauses: list[str]) -> str:
    """``clauses`` ANDed as a balanced tree: a parser reads ``a AND b AND c ...``
    as a chain as deep as it is long (SQLite refuses depths over 1,000)."""
    if len(clauses) == 1:
        return clauses[0]
    mid = len(clauses) // 2
    return f"({all_of(clauses[:mid])} AND {all_of(clauses[mid:])})"


def is_postgres(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


#: Connection parameters that are secrets: never shown.
_SECRET_KEYS = ("password", "sslpassword")


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def ambiguous_url(url: str) -> bool:
    """Whether libpq would read a ``postgresql://`` URL's credentials other than
    as written: an ``@`` or ``/`` left unencoded in the user or password makes
    it take part of the password for a host, port or database name (which it
    would then quote in its messages)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority, slash, path = rest.partition("/")  # libpq looks for the '@' up to the first '/'
    if authority.count("@") > 1:
        return True
    # No '@' before the first '/', but one further on before the query: a '/' in the password.
    return "@" not in authority and "@" in path.split("?", 1)[0]


def redact(url: str) -> str:
    """A database URL without its password, for logs and messages: rebuilt
    from what libpq reads in it (so a password with ``#``, ``?`` or ``@``, or
    given as ``?password=``, is never part of it), ``***`` where a password
    was given. A URL libpq cannot read, or would read ambiguously, is shown
    as its scheme and ``***`` only."""
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    scheme = _scheme(url)
    if ambiguous_url(url):
        return f"{scheme}***"
    try:
        info = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    except Exception:  # libpq's message may quote the URL: nothing of it is shown
        return f"{scheme}***"
    hidden = any([info.pop(k, None) is not None for k in _SECRET_KEYS])  # a list: pop every one
    user, host, port, dbname = (info.pop(k, "") for k in ("user", "host", "port", "dbname"))
    if "/" in host or "," in host or "," in port:  # a socket folder, several hosts: as parameters
        info = {"host": host, **({"port": port} if port else {}), **info}
        host = port = ""
    netloc = f"[{host}]" if ":" in host else quote(host, safe=".-_")
    if port:
        netloc += f":{quote(port, safe='')}"
    if user or hidden:
        netloc = quote(user, safe="") + (":***" if hidden else "") + "@" + netloc
    shown = f"{scheme}{netloc}" + (f"/{quote(dbname, safe='')}" if dbname else "")
    if info:
        shown += "?" + "&".join(f"{k}={quote(v, safe='/:,')}" for k, v in info.items())
    return shown


def url_secrets(url: str) -> list[str]:
    """Every form of the secrets in a database URL that a message could quote:
    the password as libpq reads it, as written in the URL (percent-encoded,
    in its user part or in a ``password=`` parameter), and, for an ambiguous
    URL, everything between its scheme and its last ``@``. Longest first."""
    from urllib.parse import unquote

    from psycopg.conninfo import conninfo_to_dict

    found = set()
    try:
        # An ambiguous URL is never connected to: libpq's reading of it (a piece of the password) is not needed.
        info = {} if ambiguous_url(url) else conninfo_to_dict(url)
    except Exception:
        info = {}
    found.update(str(info[k]) for k in _SECRET_KEYS if info.get(k))
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        userinfo = authority.split("@", 1)[0]
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    if ambiguous_url(url) and "@" in rest:
        found.add(rest.rsplit("@", 1)[0])
        userinfo = rest.rsplit("@", 1)[0]
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    for m in re.finditer(r"[?&](?:ssl)?password=([^&]*)", url):
        found.add(m.group(1))
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def url_password(url: str) -> str | None:
    """The password of a database URL as libpq reads it (decoded), or None."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(url).get("password") or None
    except Exception:
        return None
