"""What a worker searches when its collection has a snapshot: the shared,
memory-mapped generation (:class:`Snapshot`) under a private layer of the
changes since it (:class:`LayeredIndex`), and the readers that load a
collection from the tables instead (:func:`load_from_tables`). The design of
snapshots as a whole is :mod:`retrieval.collections.snapshot_manager`.

**Sharing.** A worker opens the newest generation with
``faiss.read_index(path, IO_FLAG_MMAP_IFC)`` (FAISS 1.15 maps the vectors, the
inverted lists and their ids read-only from the file instead of copying them)
and ``numpy.load(mmap_mode="r")``: the kernel's page cache holds one copy that
every process of the host maps (``MAP_SHARED``, never written), so the
workers' proportional set sizes (PSS) add up to about one copy. The
snapshot is never modified in memory (FAISS aborts the process on an add to a
mapped index); each worker keeps a :class:`LayeredIndex`: the snapshot, a small
private *delta* index of the passages added since its sequence number (flat
for a flat snapshot; IVF over the snapshot's own centroids for an IVF one) and
the set of snapshot passages deleted or replaced since (*hidden*). A search
asks the snapshot with a FAISS selector that excludes the hidden ids (and
applies the filter), asks the delta the same, and merges the two top-k lists
(each complete at its cut, :func:`retrieval.faiss_index.search_ranked`: equal
scores order and cut as in one index). For an IVF snapshot both scan the lists one quantizer search chose. The
answer is therefore the one a single index over the same live passages (and
the same centroids) gives: exact for flat, the same lists probed for IVF.
For a binary snapshot both layers give their Hamming candidates (each
complete at its cut), the merged ``rescore_multiplier * k`` best of them are
rescored with their float vectors (the snapshot's from its mapped
``vectors.npy``, only those rows; the delta's from its own), as one binary
index of the same passages would.

**Changes.** Replay is unchanged: the store replays the ``changes`` log past
the sequence number a worker has applied, into the layered index (adds go to
the delta; deletes go to the delta or to hidden), before every search, so a
write is visible to the next search in every worker, long before a rebuild.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

from ..faiss_index import (
    PassageIndex,
    binary_codes,
    candidates_wanted,
    ranked,
    rescored,
    search_preassigned,
    search_ranked,
)
from .snapshot_files import OpenGeneration

#: Rows read from the tables at once.
_CHUNK = 8192


# --- the tables (every statement is the store's Database's: retrieval.collections.database) ----------


def centroids_of(db, conn, cid: int, dim: int) -> tuple[np.ndarray | None, int]:
    """(a collection's IVF centroids, the passages they were trained on), or (None, 0)."""
    cent = db.centroids(conn, cid)
    if cent is None:
        return None, 0
    return np.frombuffer(cent[1], dtype="<f4").reshape(-1, dim), int(cent[2])


def passages_of(db, conn, cid: int, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of every passage of a collection, in chunks, in id order
    (inside ``db.consistent(conn)``)."""
    for ids, blob in db.stream_passages(conn, cid, _CHUNK):
        yield ids, np.frombuffer(blob, dtype="<f4").reshape(len(ids), dim)


def load_from_tables(db, conn, cid: int, dim: int, nprobe: int, options: dict) -> tuple[PassageIndex, int]:
    """The collection (of stored ``options``) read from the ``passages`` table
    into a private index, and the sequence number that state is at. Call it
    inside ``db.consistent(conn)``. For a worker behind the log's floor:
    replay could not bring it up to date."""
    centroids, _ = centroids_of(db, conn, cid, dim)
    index = PassageIndex.for_options(dim, options, centroids, nprobe=nprobe)
    for ids, vectors in passages_of(db, conn, cid, dim):
        index.add(ids, vectors)
    last, floor = db.log_state(conn, cid)
    return index, max(last, floor)


class Snapshot(OpenGeneration):
    """One generation, opened (retrieval/collections/snapshot_files.py), and what a layered index asks of it."""

    def centroids(self) -> np.ndarray:
        return self.index.quantizer.reconstruct_n(0, self.nlist)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of ``ids`` this snapshot holds, their rows)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.ntotal or not len(ids):
            return np.zeros(len(ids), bool), np.empty(0, np.int64)
        rows = np.minimum(np.searchsorted(self.ids, ids), self.ntotal - 1)
        found = np.asarray(self.ids[rows]) == ids
        return found, rows[found]


# --- the layered index -----------------------------------------------------------------


class LayeredIndex:
    """A shared snapshot, plus this process's changes since its sequence number:
    a private delta index of the passages added and the set of snapshot
    passages removed (hidden). The interface of :class:`PassageIndex`."""

    def __init__(self, base: Snapshot, nprobe: int, rescore_multiplier: int | None = None):
        self.base = base
        self.dim, self.kind, self.nlist = base.dim, base.kind, base.nlist
        self.nprobe = nprobe
        if self.kind == "binary":
            self.delta = PassageIndex(self.dim, nprobe=nprobe, binary=True, rescore_multiplier=rescore_multiplier)
        else:
            self.delta = PassageIndex(self.dim, base.centroids() if self.kind == "ivf" else None, nprobe=nprobe)
        self.rescore_multiplier = self.delta.rescore_multiplier
        self.hidden: set[int] = set()
        self._hidden: tuple | None = None  # (ids, the selector that excludes them), made when first needed

    @property
    def generation(self) -> int:
        return self.base.generation

    @property
    def ntotal(self) -> int:
        return self.base.ntotal - len(self.hidden) + self.delta.ntotal

    @property
    def pending(self) -> int:
        """Changes held privately: what a rebuild would fold into the snapshot."""
        return self.delta.ntotal + len(self.hidden)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.delta.add(ids, vectors)  # passage ids are never reused: none of them is in the snapshot

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        found, _ = self.base.locate(ids)
        fresh = set(ids[found].tolist()) - self.hidden
        if fresh:
            self.hidden |= fresh
            self._hidden = None
        self.delta.remove(ids[~found])

    def _hidden_selector(self) -> tuple:
        if self._hidden is None:
            ids = np.fromiter(self.hidden, np.int64, len(self.hidden))
            # A flat or binary snapshot is searched by row.
            keys = self.base.locate(ids)[1] if self.kind != "ivf" else ids
            inner = faiss.IDSelectorBatch(keys)
            self._hidden = (ids, inner, faiss.IDSelectorNot(inner))
        return self._hidden

    def search(self, query: np.ndarray, top_k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`PassageIndex.search` answers for an index of the same live passages."""
        total = self.ntotal
        if total == 0 or (allowed is not None and len(allowed) == 0):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        top_k = max(1, min(top_k, total))
        keep = []  # selectors a search's parameters point to: alive until the searches are done
        base_n = self.base.ntotal - len(self.hidden)
        base_sel = self._hidden_selector()[2] if self.hidden else None
        delta_sel = None
        if allowed is not None:
            allowed = np.ascontiguousarray(allowed, dtype=np.int64)
            delta_sel = faiss.IDSelectorBatch(allowed)
            keys = allowed[~np.isin(allowed, self._hidden_selector()[0])] if self.hidden else allowed
            if self.kind != "ivf":
                keys = self.base.locate(keys)[1]
            base_n = min(base_n, len(keys))
            base_sel = faiss.IDSelectorBatch(keys) if len(keys) else None
            keep += [delta_sel, base_sel]
        parts = []
        if self.kind == "binary":
            result = self._search_binary(query, top_k, allowed, base_n, base_sel)
            del keep
            return result
        if self.kind == "ivf":
            nprobe = self.nprobe
            if allowed is not None and len(allowed) * 10 < total:
                nprobe = self.nlist  # a narrow filter: scan every list (as PassageIndex does)
            nprobe = min(nprobe, self.nlist)
            coarse_scores, coarse_ids = self.base.index.quantizer.search(query, nprobe)
            layers = ((self.base.index, base_n, base_sel), (self.delta.index, self.delta.ntotal, delta_sel))
            for index, layer_total, sel in layers:
                if layer_total > 0:
                    params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)

                    def search(width, index=index, params=params):
                        scores, ids = search_preassigned(index, query, width, coarse_ids, coarse_scores, params)
                        return scores[ids >= 0], ids[ids >= 0]

                    parts.append(search_ranked(search, min(top_k, layer_total), layer_total))
        else:
            if base_n > 0:
                params = faiss.SearchParameters(sel=base_sel) if base_sel is not None else None

                def search(width):
                    scores, rows = self.base.index.search(query, width, params=params)
                    found = rows[0] >= 0
                    return scores[0][found], np.asarray(self.base.ids[rows[0][found]])

                parts.append(search_ranked(search, min(top_k, base_n), base_n))
            if self.delta.ntotal:
                parts.append(self.delta.search(query, top_k, allowed))
        del keep
        if not parts:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        # Each layer's top_k best in the defined order, ties at its cut included: so are the top_k best of both.
        return ranked(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), top_k)

    def _search_binary(self, query: np.ndarray, top_k: int, allowed: np.ndarray | None, base_n: int,
                       base_sel) -> tuple[np.ndarray, np.ndarray]:
        """Both layers' Hamming candidates, the best ``rescore_multiplier * top_k`` of them
        rescored with their float vectors: what one binary index of the live passages answers."""
        wanted = candidates_wanted(top_k, self.rescore_multiplier, self.ntotal)
        parts = []
        if base_n > 0:
            code = binary_codes(query)
            params = faiss.SearchParameters(sel=base_sel) if base_sel is not None else None

            def search(width):
                distances, rows = self.base.index.search(code, width, params=params)
                found = rows[0] >= 0
                return -distances[0][found].astype(np.float32), np.asarray(self.base.ids[rows[0][found]])

            parts.append(search_ranked(search, min(wanted, base_n), base_n))
        if self.delta.ntotal:
            parts.append(self.delta.candidates(query, wanted, allowed))
        if not parts:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        _, ids = ranked(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), wanted)
        found, rows = self.base.locate(ids)
        vectors = np.empty((len(ids), self.dim), np.float32)
        vectors[found] = self.base.vectors[rows]  # only these rows of the mapped file are read
        vectors[~found] = self.delta.float_vectors(ids[~found])
        return rescored(query, ids, vectors, top_k)
