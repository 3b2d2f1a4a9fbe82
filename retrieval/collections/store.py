"""Vector collections, shared by every worker of a host, or of many hosts.

Where they are kept is a :class:`retrieval.collections.database.Database`: by default one
SQLite file under ``SHM_EMBED_DATA_DIR`` that every worker of the host shares
(:mod:`retrieval.collections.sqlite_db`), or, with ``SHM_EMBED_COLLECTIONS_URL``, a
PostgreSQL server that the workers of every host share
(:mod:`retrieval.collections.postgres_db`). Either way every write (a batch of documents,
a delete) is one transaction, durable when it returns, and a writer killed
half-way leaves the previous state. The tables are plain SQL that any later
vector store can read: ``collections``, ``documents``, ``passages`` (vectors
as little-endian float32 bytes), ``centroids`` and ``changes``. A failure of
the storage itself (a corrupt file, a full disk, a server that is down) is a
typed :class:`StorageUnavailable`; this module holds no SQL of its own.

Names, options and documents are checked (and documents split into
passages) by :mod:`retrieval.collections.documents` before anything here runs.

Each worker keeps a FAISS index per collection in memory (see
:mod:`retrieval.faiss_index`) and brings it up to date before every search by
replaying the ``changes`` log past the last sequence number it has applied, so
a write by any worker is visible to the next search in every worker. Passage
ids are never reused, which makes replay order-free; each database makes sure
a sequence number is only seen once every smaller one of its collection is
committed (see :mod:`retrieval.collections.database`).

With snapshots (the default, ``SHM_EMBED_SNAPSHOTS``) that index is a shared,
memory-mapped snapshot of the collection, kept under the host's data
directory, plus the changes since it, rebuilt in the background; the change
log is compacted once every live host's snapshot covers it: see
:mod:`retrieval.collections.snapshot_manager`. Both stores have them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import faiss
import numpy as np
from loguru import logger

from shm_protocol.errors import InvalidInput, ModelNotFound, RequestTooLarge
from shm_protocol.model_files import named, served_models

from ..errors import CollectionConflict, CollectionNotFound
from ..faiss_index import POINTS_PER_CENTROID, PassageIndex, ivf_need, nlist_for, train_centroids
from ..passages import PassageSplitter, splitter_for
from .database import OP_ADD, OP_DEL, CollectionRow, Database, FilterKey
from .documents import CollectionOptions, Document, check_name, check_text, parse_documents
from .factory import location_of, open_database
from .snapshot_index import load_from_tables
from .snapshot_manager import DELTA_MAX, STALE_HOST_S, SnapshotManager
from .sqlite_db import DB_FILE, SCHEMA, SCHEMA_VERSION  # noqa: F401  (where they were)

MAX_TOP_K = 1000
#: Change-log entries read per query while replaying.
_REPLAY_CHUNK = 8192

#: A metadata key a filter may name; it is written into a JSON path literal, so no quotes or backslashes.
_FILTER_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ -]{0,127}")
#: Values a filter lists at most unless the settings say otherwise (SHM_EMBED_FILTER_MAX_VALUES).
FILTER_MAX_VALUES = 1000


def _guarded(method):
    """``method`` with its storage failures raised as typed errors (StorageUnavailable,
    StorageBusy) and logged with their details; SQL mistakes stay what they are."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            typed = self.db.storage_error(exc, method.__name__)
            if typed is None:
                raise
            raise typed from None

    return guarded


class _Loaded:
    """One collection's FAISS index in this process and how far it has replayed."""

    def __init__(self, cid: int, dim: int, nprobe: int, options: dict):
        self.cid = cid
        self.dim = dim
        self.options = options  # the collection's, as stored
        self.seq = 0
        self.index = PassageIndex.for_options(dim, options, nprobe=nprobe)
        #: Change-log entries replayed into ``index`` since it was made: what a new worker replays too.
        self.replayed = 0
        self.lock = threading.Lock()


def _index_info(options: dict, nlist: int | None, nprobe: int) -> dict:
    """What a collection's info says of its index."""
    if options.get("index") == "binary":
        return {"kind": "binary", "nlist": 0, "nprobe": 0, "rescore_multiplier": options["rescore_multiplier"]}
    return {"kind": "ivf" if nlist else "flat", "nlist": nlist or 0, "nprobe": nprobe if nlist else 0}


def passages_asked(top_k: int, limit: int) -> int:
    """Passages a search first asks its index for, to find ``top_k`` documents among ``limit``
    passages (documents of several passages may take a wider second ask)."""
    return min(limit, top_k * 4 + 8)


class CollectionStore:
    """Collections of documents, embedded through ``client`` and searched with FAISS.

    ``location`` is a directory (the SQLite store) or a ``postgresql://`` URL
    (the PostgreSQL store); the rest of the API is the same for both.

    ``snapshots``: serve collections from index snapshots shared by the
    processes of this host, kept under ``snapshot_dir`` (this host's data
    directory; for the SQLite store ``location`` unless given). A PostgreSQL
    store without a ``snapshot_dir`` has none: each process holds its own index."""

    def __init__(self, location: str | os.PathLike, client, *, nprobe: int = 32,
                 ivf_min_vectors: int = 50_000, search_threads: int = 1, busy_timeout_s: float = 30.0,
                 filter_max_values: int = FILTER_MAX_VALUES, pool_size: int = 4, timeout_s: float = 5.0,
                 snapshots: bool = True, snapshot_dir: str | os.PathLike | None = None,
                 snapshot_delta: int = DELTA_MAX, snapshot_stale_host_s: float = STALE_HOST_S):
        self.client = client
        self.nprobe = nprobe
        self.ivf_min_vectors = ivf_min_vectors
        self.filter_max_values = filter_max_values
        # FAISS's OpenMP threads are process-wide. A worker searching with every core would
        # take them from the sidecar's model (and OpenMP's spinning threads from each other).
        faiss.omp_set_num_threads(search_threads)
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}
        self._model: tuple[str, int] | None = None
        # Opens (creates, migrates) the database; its failures are already typed errors.
        self.db: Database = open_database(location, busy_timeout_s=busy_timeout_s, pool_size=pool_size,
                                          timeout_s=timeout_s)
        self.where = self.db.where
        self.busy_timeout_s, self.timeout_s = busy_timeout_s, timeout_s
        if snapshot_dir is None and self.db.kind == "sqlite":
            snapshot_dir = location
        self.snapshots = (SnapshotManager(self, snapshot_dir, delta_max=snapshot_delta,
                                          stale_host_s=snapshot_stale_host_s)
                          if snapshots and snapshot_dir is not None else None)

    @classmethod
    def from_settings(cls, settings, client) -> CollectionStore:
        return cls(location_of(settings), client, nprobe=settings.search_nprobe,
                   ivf_min_vectors=settings.ivf_min_vectors, search_threads=settings.search_threads,
                   filter_max_values=settings.filter_max_values, pool_size=settings.collections_pool,
                   timeout_s=settings.collections_timeout_s, snapshots=settings.snapshots,
                   snapshot_dir=settings.data_dir, snapshot_delta=settings.snapshot_delta,
                   snapshot_stale_host_s=settings.snapshot_stale_host_s)

    @property
    def path(self):
        """The SQLite file (the SQLite store only)."""
        return self.db.path

    def close(self) -> None:
        if self.snapshots is not None:
            self.snapshots.close()
        with self._lock:
            self._loaded.clear()
        self.db.close()

    # --- model identity -----------------------------------------------------------
    def model(self, requested: str | None = None) -> tuple[str, int]:
        """(name, dimension) of the embedding model ``requested`` names
        (None: the service's default one); ModelNotFound if none is served."""
        for fresh in (False, True):
            # The served models, remembered; looked up again when a name is
            # missing (the sidecar restarted with other models) and never
            # remembered from a local fallback, which serves one model while
            # the sidecar is down.
            info = self._model if self._model is not None and not fresh else self.client.info()
            if getattr(self.client, "mode", "ipc") == "ipc":
                self._model = info
            served = [m for m in served_models(info) if m["kind"] == "embed"]
            match = served[0] if requested is None and served else named(served, requested, lambda m: m["name"])
            if match is not None:
                return str(match["name"]), int(match["dimension"])
        raise ModelNotFound(f"no embedding model named {requested!r} is served here (served: "
                            f"{', '.join(m['name'] for m in served)})", requested=str(requested),
                            served=[m["name"] for m in served])

    def _embed_options(self, row: CollectionRow, prompt: str | None) -> dict:
        """What an embed call for collection ``row`` adds: its model unless it
        is the default, its prompt when it has one (so that a plain object
        with ``embed(texts, normalize=...)`` still serves a default collection)."""
        out = {}
        if row.model != self.model()[0]:
            out["model"] = row.model
        if prompt is not None:
            out["prompt"] = prompt
        return out

    def _splitter(self, row: CollectionRow, opts: CollectionOptions) -> PassageSplitter:
        return splitter_for(self.client, row.model, opts.document_prompt, words=opts.passage_words,
                            overlap=opts.overlap_words)

    def _row(self, conn, name: str, *, check_model: bool = True, lock: bool = False) -> CollectionRow:
        """The collection named ``name`` (CollectionNotFound if none); ``lock`` (in a write):
        hold its write lock to the end of the transaction."""
        check_name(name)
        row = self.db.collection(conn, name, lock=lock)
        if row is None:
            with self._lock:
                self._loaded.pop(name, None)  # deleted by another worker: free its index here too
            raise CollectionNotFound(f"no collection named {name!r}")
        if check_model:
            self._check_model(row)
        return row

    def _check_model(self, row: CollectionRow) -> None:
        """CollectionConflict unless the collection's model is served here, with its dimension."""
        try:
            model, dim = self.model(row.model)
        except ModelNotFound:
            model, dim = self.model()
        if row.model != model or row.dim != dim:
            raise CollectionConflict(
                f"collection {row.name!r} was made with {row.model} ({row.dim} dimensions); "
                f"this service embeds with {model} ({dim} dimensions)")

    # --- collections --------------------------------------------------------------
    @_guarded
    def create(self, name: str, options: dict | None = None) -> tuple[dict, bool]:
        """Create a collection; returns (its info, whether it was created now).
        An existing one with the same model (and the same options, when
        given) is returned as it is; otherwise CollectionConflict."""
        check_name(name)
        opts = CollectionOptions.from_dict(options)
        model, dim = self.model(opts.model)
        if opts.index == "binary" and dim % 8:
            raise InvalidInput(f"'index' binary packs 8 dimensions a byte: {model}'s {dim} is not a multiple of 8")
        opts = replace(opts, model=model)
        with self.db.write() as conn:
            created = self.db.add_collection(conn, name, model, dim, asdict(opts), time.time())
            row = self.db.collection(conn, name)
        if not created:
            self._check_model(row)
            stored = asdict(replace(CollectionOptions.from_dict(row.options), model=row.model))
            if options is not None and stored != asdict(opts):
                raise CollectionConflict(f"collection {name!r} exists with other options: {json.dumps(row.options)}")
        else:
            logger.info("collection {} created ({}, {} dimensions, {})", name, model, dim, asdict(opts))
        return self.info(name), created

    @_guarded
    def info(self, name: str) -> dict:
        with self.db.read() as conn:
            row = self._row(conn, name, check_model=False)
            docs, passages = self.db.counts(conn, row.cid)
            nlist = self.db.nlist(conn, row.cid)
        return {
            "name": row.name, "model": row.model, "dimension": row.dim,
            "documents": docs, "passages": passages, "options": row.options,
            "index": _index_info(row.options, nlist, self.nprobe),
            "created": row.created,
        }

    @_guarded
    def list(self) -> list[dict]:
        with self.db.read() as conn:
            names = self.db.collection_names(conn)
        out = []
        for name in names:
            try:
                out.append(self.info(name))
            except CollectionNotFound:  # deleted meanwhile
                pass
        return out

    @_guarded
    def delete(self, name: str) -> None:
        with self.db.write() as conn:
            cid = self._row(conn, name, check_model=False).cid
            self.db.drop_collection(conn, cid)
        with self._lock:
            self._loaded.pop(name, None)
        if self.snapshots is not None:
            # Now, not at some later sweep: processes that still map its files keep their data until they unmap.
            self.snapshots.remove_collection(cid)
        logger.info("collection {} deleted", name)

    # --- documents ------------------------------------------------------------------
    @_guarded
    def prepare(self, name: str, documents: Any) -> list[Document]:
        """Validate documents and split them into passages (no embedding yet)."""
        with self.db.read() as conn:
            row = self._row(conn, name)
        opts = CollectionOptions.from_dict(row.options)
        docs = parse_documents(documents, opts, self._splitter(row, opts))
        self.db.check_documents(docs)
        return docs

    @_guarded
    def upsert(self, name: str, documents: Any, *, max_passages: int | None = None,
               max_tokens: int | None = None) -> dict:
        """Add or replace documents by id; returns ``{"ids": [...], "passages": n}``.

        Every passage is embedded (through the sidecar, in one batched call)
        before the write begins, so the store is locked only for the insert.
        ``max_passages`` and ``max_tokens`` are the caller's budget for the
        call (RequestTooLarge above either, before anything is embedded)."""
        with self.db.read() as conn:
            row = self._row(conn, name)
        opts = CollectionOptions.from_dict(row.options)
        docs = parse_documents(documents, opts, self._splitter(row, opts))  # each of at least one passage
        self.db.check_documents(docs)
        passages = [p for d in docs for p in d.passages]
        embed = self._embed_options(row, opts.document_prompt)
        if max_passages is not None and len(passages) > max_passages:
            raise RequestTooLarge(f"the documents make {len(passages)} passages, over the limit of {max_passages} "
                                  "per request (SHM_EMBED_MAX_INPUTS)", limit=max_passages, actual=len(passages),
                                  what="passages")
        if max_tokens is None:  # any object with embed() serves a store used as a library
            vectors = self.client.embed(passages, normalize=True, **embed)
        else:
            vectors = self.client.embed_detailed(passages, normalize=True, max_tokens=max_tokens, **embed).vectors
        return self.write_embedded(name, docs, vectors)

    @_guarded
    def write_embedded(self, name: str, docs: list[Document], vectors: np.ndarray) -> dict:
        """Store already-embedded documents (rows of ``vectors`` in passage order)."""
        with self.db.read() as conn:
            dim = self._row(conn, name).dim
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        expected = (sum(len(d.spans) for d in docs), dim)
        if vectors.shape != expected:
            raise InvalidInput(f"expected {expected[0]} vectors of {dim}, got {vectors.shape}")
        if len({d.id for d in docs}) != len(docs):
            raise InvalidInput("a document id appears twice in one write")
        self.db.check_documents(docs)
        total = None
        with self.db.write() as conn:
            row = self._row(conn, name, lock=True)  # the collection's writers queue here, in commit order
            self.db.remove_documents(conn, row.cid, [d.id for d in docs])
            self.db.insert_documents(conn, row.cid, docs, vectors, time.time())
            if row.options["index"] in ("auto", "ivf") and self.db.nlist(conn, row.cid) is None:
                total = self.db.passage_count(conn, row.cid)
        if total is not None:
            self._maybe_train(row, total)
        return {"ids": [d.id for d in docs], "passages": len(vectors)}

    @_guarded
    def delete_document(self, name: str, doc_id: str) -> None:
        with self.db.write() as conn:
            row = self._row(conn, name, check_model=False, lock=True)
            if not self.db.remove_documents(conn, row.cid, [doc_id]):
                raise CollectionNotFound(f"collection {name!r} has no document {doc_id!r}")

    @_guarded
    def get_document(self, name: str, doc_id: str) -> dict:
        with self.db.read() as conn:
            doc = self.db.document(conn, self._row(conn, name, check_model=False).cid, doc_id)
        if doc is None:
            raise CollectionNotFound(f"collection {name!r} has no document {doc_id!r}")
        return doc

    # --- the IVF quantizer -------------------------------------------------------------
    def _maybe_train(self, row: CollectionRow, total: int) -> None:
        need = ivf_need(row.options, self.ivf_min_vectors)
        if need is None or total < need:
            return
        if self.snapshots is not None:
            self.snapshots.request_build(row.cid, "the IVF quantizer is due")  # trained there, not in a request
            return
        nlist = nlist_for(total)
        with self.db.read() as conn:
            blob = self.db.sample_vectors(conn, row.cid, min(total, nlist * POINTS_PER_CENTROID))
        sample = np.frombuffer(blob, dtype="<f4").reshape(-1, row.dim)
        t0 = time.perf_counter()
        centroids = train_centroids(sample, nlist)
        with self.db.write() as conn:
            self.db.add_centroids(conn, row.cid, centroids, total)
        logger.info("collection {}: IVF quantizer of {} lists trained on {} passages in {:.1f} s",
                    row.name, len(centroids), len(sample), time.perf_counter() - t0)

    # --- searching ---------------------------------------------------------------------
    @_guarded
    def warm(self) -> int:
        """Load the index of every collection of this model now (a worker
        calls it at start, so its first search of a big collection is not the
        one that waits for the load). Returns the passages loaded."""
        total = 0
        with self.db.read() as conn:
            for name in self.db.collection_names(conn):
                try:
                    total += self._sync(conn, self._row(conn, name)).index.ntotal
                except (CollectionNotFound, CollectionConflict):
                    pass
        if self.snapshots is not None:
            self.snapshots.sweep()  # snapshots of collections deleted while this worker was away
        return total

    def _sync(self, conn, row: CollectionRow) -> _Loaded:
        """This process's index of the collection, brought up to the last committed write."""
        name, cid, dim = row.name, row.cid, row.dim
        with self._lock:
            lo = self._loaded.get(name)
            if lo is None or lo.cid != cid:
                lo = self._loaded[name] = _Loaded(cid, dim, self.nprobe, row.options)
        with lo.lock:
            # One state of the database: a compaction cannot slip between reading the floor and the replay.
            with self.db.consistent(conn):
                last, floor = self.db.log_state(conn, cid)
                if lo.seq > max(last, floor):  # the log went back (a database restored from a backup): start over
                    logger.warning("collection {}: applied changes up to {}, but the log ends at {}: loading again",
                                   name, lo.seq, max(last, floor))
                    lo.index, lo.seq, lo.replayed = PassageIndex.for_options(dim, row.options, nprobe=self.nprobe), 0, 0
                shared = self.snapshots is not None and self.snapshots.refresh(lo, floor, row, last)
                # "flat" never trains
                if not shared and lo.index.kind == "flat" and row.options.get("index") != "flat":
                    cent = self.db.centroids(conn, cid)
                    if cent is not None:
                        lo.index = PassageIndex(dim, np.frombuffer(cent[1], dtype="<f4").reshape(-1, dim),
                                                nprobe=self.nprobe)
                        lo.seq = lo.replayed = 0
                if lo.seq < floor:  # the log no longer holds what this process missed: read the tables
                    logger.info("collection {}: applied changes up to {}, the log starts after {}: loading from the "
                                "tables", name, lo.seq, floor)
                    lo.index, lo.seq = load_from_tables(self.db, conn, cid, dim, self.nprobe, row.options)
                    lo.replayed = 0
                elif last > lo.seq:
                    self._replay(conn, lo, last)
            if self.snapshots is not None:
                self.snapshots.after_sync(lo, row.options)
        return lo

    def _replay(self, conn, lo: _Loaded, last: int) -> None:
        """Apply the collection's change-log entries after ``lo.seq`` up to ``last``, a chunk at a time."""
        while lo.seq < last:
            rows = self.db.changes(conn, lo.cid, lo.seq, last, _REPLAY_CHUNK)
            if not rows:
                break
            gone = np.array([r[2] for r in rows if r[1] == OP_DEL], dtype=np.int64)
            added = [r for r in rows if r[1] == OP_ADD and r[3] is not None]
            lo.index.remove(gone)
            if added:
                vecs = np.frombuffer(b"".join(r[3] for r in added), dtype="<f4").reshape(len(added), lo.dim)
                lo.index.add(np.array([r[2] for r in added], dtype=np.int64), vecs)
            lo.seq = rows[-1][0]
            lo.replayed += len(rows)
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
        with self.db.read() as conn:
            row = self._row(conn, name)
        opts = CollectionOptions.from_dict(row.options)
        qv = self.client.embed([query], normalize=True,  # no connection held meanwhile
                               **self._embed_options(row, opts.query_prompt))[0]
        return self.search_vector(name, qv, top_k, filter, row=row)

    @_guarded
    def search_vector(self, name: str, qv: np.ndarray, top_k: int = 10, filter: dict | None = None, *,
                      row: CollectionRow | None = None) -> list[dict]:
        keys = self._filter_keys(filter) if filter is not None else None
        with self.db.read() as conn:
            row = row if row is not None else self._row(conn, name)
            lo = self._sync(conn, row)
            allowed = self.db.filtered_pids(conn, row.cid, keys) if keys else None
            limit = lo.index.ntotal if allowed is None else len(allowed)
            asked = passages_asked(top_k, limit)
            best: dict[str, tuple[float, int, int]] = {}
            order: list[tuple[str, tuple[float, int, int]]] = []
            while asked > 0:
                with lo.lock:
                    scores, ids = lo.index.search(qv, asked, allowed)
                where = self.db.passages_by_pid(conn, ids)
                best.clear()
                for score, pid in zip(scores.tolist(), ids.tolist()):
                    hit = where.get(pid)
                    if hit is None:
                        continue
                    # A document's best passage; of equal ones its first (spans start in passage order).
                    held = best.get(hit[0])
                    if held is None or score > held[0] or (score == held[0] and hit[1] < held[1]):
                        best[hit[0]] = (score, hit[1], hit[2])
                # Equal scores go by document id, and the cut at top_k must be defined too: the candidates
                # hold every passage scoring above the last one, so when the top_k-th document scores above
                # it no document tied with that one is missing; when it scores the same, fetch wider.
                order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))
                if asked >= limit or len(ids) < asked or (len(order) >= top_k and order[top_k - 1][1][0] > scores[-1]):
                    break
                asked = min(limit, asked * 4)
            chosen = order[:top_k]
            docs = self.db.documents_by_id(conn, row.cid, [c[0] for c in chosen])
        out = []
        for doc_id, (score, a, b) in chosen:
            d = docs.get(doc_id)
            if d is None:  # deleted between the index search and this read
                continue
            url, metadata, text = d
            out.append({"id": doc_id, "score": float(score), "passage": text[a:b], "url": url,
                        "metadata": metadata})
        return out

    def _filter_keys(self, filter: Any) -> list[FilterKey]:
        """The keys of a search filter, checked: each matches a value, or any
        of a list of values (null: the key is null or missing); all must match.
        An empty filter is no restriction."""
        if not isinstance(filter, dict):
            raise InvalidInput("'filter' must be an object of metadata keys and values")
        check_text(filter, "filter")  # nothing stored holds such text, and PostgreSQL cannot compare it
        wanted = {key: want if isinstance(want, list) else [want] for key, want in filter.items()}
        total = sum(len(values) for values in wanted.values())
        if total > self.filter_max_values:
            raise InvalidInput(f"'filter' lists {total} values; at most {self.filter_max_values} are allowed "
                               "(SHM_EMBED_FILTER_MAX_VALUES)")
        keys = []
        for key, values in wanted.items():
            if not isinstance(key, str) or not _FILTER_KEY.fullmatch(key):
                raise InvalidInput(f"filter key {key!r}: letters, digits, '_', '-' and spaces only")
            if not values or not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
                raise InvalidInput(f"filter {key!r}: a string, number, boolean, null or a non-empty list of them")
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise InvalidInput("'filter': NaN and infinite numbers are not allowed")
            given = [v for v in values if v is not None]
            keys.append(FilterKey(key, given, len(given) < len(values)))
        return keys
