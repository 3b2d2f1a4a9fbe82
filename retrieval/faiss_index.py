"""The FAISS side of a collection: passage vectors by passage id.

Vectors are L2-normalised and searched by inner product, so a score is the
cosine similarity (1 is identical, higher is closer). Two kinds:

- ``flat``: exhaustive and exact (``IndexIDMap2(IndexFlatIP)``). A query costs
  one pass over every vector: about a millisecond per 10k vectors here.
- ``ivf``: ``IndexIVFFlat`` over a k-means quantizer of ``nlist`` centroids;
  a query scans the ``nprobe`` lists closest to it, so a million passages
  answer in milliseconds at a small loss of recall (``bench/search.py``
  measures both). Vectors stay uncompressed, so scores are exact cosines.
- ``binary``: one sign bit per dimension (bit = value > 0, packed with
  ``np.packbits``, as sentence-transformers' ``quantize_embeddings``
  "ubinary" does) in an ``IndexBinaryFlat`` searched by Hamming distance for
  ``rescore_multiplier * k`` candidates (fewest differing bits first, equal
  distances by passage id), which are then rescored with their float vectors:
  scores are exact cosines, and only the candidates' float vectors are read.
  The codes take 1 bit per dimension where a float index takes 32
  (docs/binary-index.md).

The centroids are trained once per collection and stored with it, so every
worker builds the same index and answers the same results.

Results come in one defined order: best score first, equal scores by passage
id. FAISS leaves both the order of equal scores and which of them make a cut
at ``k`` to its heap, which differs by index layout (a snapshot plus its delta,
or one index), so each search fetches past ``k`` until the last candidate
scores below the ``k``-th (:func:`search_ranked`), then sorts and cuts.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from .collections.documents import RESCORE_MULTIPLIER

#: Training points per centroid: plenty for IVF, and what bounds the k-means sample.
POINTS_PER_CENTROID = 64
#: Candidates fetched past k, so that a tie at the k-th score seldom needs a second, wider search.
TIE_MARGIN = 8


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """The packed sign bits of ``vectors`` (rows): bit = value > 0, 8 dimensions per byte, most significant first."""
    return np.packbits(np.asarray(vectors) > 0, axis=-1)


def rescored(query: np.ndarray, ids: np.ndarray, vectors: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` best of the candidates ``ids`` (float ``vectors``, a row each) by inner product
    with ``query``, in the defined order. Each row's dot product is computed alone (einsum), so a
    passage scores the same whichever candidates come with it."""
    scores = np.einsum("ij,j->i", np.asarray(vectors, dtype=np.float32), query.reshape(-1).astype(np.float32))
    return ranked(scores.astype(np.float32), np.asarray(ids, dtype=np.int64), top_k)


def candidates_wanted(top_k: int, rescore_multiplier: int, total: int) -> int:
    """Hamming candidates a binary search rescores for ``top_k`` results of ``total`` passages."""
    return max(1, min(total, top_k * rescore_multiplier))


def ranked(scores: np.ndarray, ids: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` first of ``(scores, ids)`` in the defined order: score descending, then id ascending."""
    order = np.lexsort((ids, -scores))[:top_k]
    return scores[order], ids[order]


def search_ranked(search, top_k: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` best of an index in the defined order. ``search(width)`` answers
    FAISS's ``width`` best (scores, ids; no ``-1`` filler) of at most ``total``
    candidates. Every candidate tied with the ``top_k``-th must be among those
    fetched for the cut to be defined: fetch wider until the last one fetched
    scores below the ``top_k``-th, or all were fetched."""
    width = min(total, top_k + TIE_MARGIN)
    while True:
        scores, ids = search(width)
        if width >= total or len(ids) < width or len(ids) <= top_k or scores[-1] < scores[top_k - 1]:
            return ranked(scores, ids, top_k)
        width = min(total, 4 * width)


#: Passages of an index "ivf" collection before its quantizer is trained (exhaustive until then).
IVF_EXPLICIT_MIN = 1000


def ivf_need(options: dict, ivf_min_vectors: int) -> int | None:
    """Passages at which a collection of these options trains its IVF quantizer
    (None: never); ``ivf_min_vectors`` is the store's threshold for ``auto``."""
    return {"auto": ivf_min_vectors, "ivf": IVF_EXPLICIT_MIN}.get(options["index"])


def nlist_for(n: int) -> int:
    """Inverted lists for a collection trained at ``n`` vectors: about 4 sqrt(n)."""
    return int(min(16384, max(16, 4 * math.sqrt(n))))


def train_centroids(vectors: np.ndarray, nlist: int, *, seed: int = 1234,
                    max_points: int = POINTS_PER_CENTROID) -> np.ndarray:
    """Spherical k-means centroids of (a sample of) ``vectors``; at most
    ``max_points`` points per centroid are used, which is plenty for IVF."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    nlist = min(nlist, n)
    take = min(n, nlist * max_points)
    if take < n:
        rng = np.random.default_rng(seed)
        vectors = vectors[np.sort(rng.choice(n, take, replace=False))]
    km = faiss.Kmeans(dim, nlist, niter=12, spherical=True, seed=seed, max_points_per_centroid=max_points)
    km.train(vectors)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def search_preassigned(index, query: np.ndarray, top_k: int, coarse_ids: np.ndarray, coarse_scores: np.ndarray,
                       params) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids of the ``top_k`` best of one query in an IVF ``index``,
    scanning the lists ``coarse_ids`` (with ``coarse_scores``) that its
    quantizer chose already: two indexes over the same centroids then scan
    the same lists for one quantizer search. ``params`` (SearchParametersIVF,
    its nprobe equal to the width of ``coarse_ids``) carries a selector; FAISS's
    Python wrapper of this call refuses parameters, so the C++ method is
    called directly. Ids of ``-1`` fill what was not found."""
    query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    coarse_ids = np.ascontiguousarray(coarse_ids, dtype=np.int64).reshape(1, -1)
    coarse_scores = np.ascontiguousarray(coarse_scores, dtype=np.float32).reshape(1, -1)
    scores = np.empty((1, top_k), np.float32)
    ids = np.full((1, top_k), -1, np.int64)
    index.search_preassigned_c(1, faiss.swig_ptr(query), top_k, faiss.swig_ptr(coarse_ids),
                               faiss.swig_ptr(coarse_scores), faiss.swig_ptr(scores), faiss.swig_ptr(ids), False,
                               params)
    return scores[0], ids[0]


class PassageIndex:
    """A FAISS index of passage ids, ``flat``, ``ivf`` (from given centroids) or
    ``binary`` (``binary=True``: sign-bit codes, rescored with float vectors that
    this index keeps for its own passages: a private index is a delta, or the
    whole collection only where there are no snapshots)."""

    def __init__(self, dim: int, centroids: np.ndarray | None = None, *, nprobe: int = 32, binary: bool = False,
                 rescore_multiplier: int = RESCORE_MULTIPLIER):
        self.dim = dim
        self.nprobe = nprobe
        self.rescore_multiplier = rescore_multiplier
        if binary:
            self.kind = "binary"
            self.nlist = 0
            self.index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(dim))
            self.floats = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # read by id (reconstruct), never searched
        elif centroids is None:
            self.kind = "flat"
            self.nlist = 0
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            self.kind = "ivf"
            centroids = np.ascontiguousarray(centroids, dtype=np.float32)
            self.nlist = int(centroids.shape[0])
            self.quantizer = faiss.IndexFlatIP(dim)
            self.quantizer.add(centroids)
            self.index = faiss.IndexIVFFlat(self.quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.is_trained = True

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def for_options(cls, dim: int, options: dict, centroids: np.ndarray | None = None, *,
                    nprobe: int = 32) -> PassageIndex:
        """An empty index of the kind a collection of ``options`` (its stored options) searches."""
        if options.get("index") == "binary":
            return cls(dim, nprobe=nprobe, binary=True, rescore_multiplier=int(options["rescore_multiplier"]))
        return cls(dim, centroids, nprobe=nprobe)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if self.kind == "binary":
                self.index.add_with_ids(binary_codes(vectors), ids)
                self.floats.add_with_ids(vectors, ids)
            else:
                self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            self.index.remove_ids(ids)
            if self.kind == "binary":
                self.floats.remove_ids(ids)

    def float_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The float vectors of some of this binary index's passages (rows in the order of ``ids``)."""
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        return self.floats.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def candidates(self, query: np.ndarray, wanted: int, allowed: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(minus the Hamming distance, ids) of the ``wanted`` passages of this binary index whose
        codes are nearest to the query's, fewest differing bits first, equal distances by id
        (complete at the cut, as :func:`search_ranked` makes it)."""
        total = self.ntotal if allowed is None else min(self.ntotal, len(allowed))
        if total == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        code = binary_codes(np.asarray(query, dtype=np.float32).reshape(1, self.dim))
        params = None
        if allowed is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))

        def search(width: int) -> tuple[np.ndarray, np.ndarray]:
            distances, ids = self.index.search(code, width, params=params)
            keep = ids[0] >= 0
            return -distances[0][keep].astype(np.float32), ids[0][keep]

        return search_ranked(search, min(wanted, total), total)

    def search(self, query: np.ndarray, top_k: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``top_k`` passages nearest to one query, best
        first, equal scores by id; ``allowed`` restricts the search to those
        ids. No ``-1`` id (FAISS's filler when fewer than ``top_k`` exist) ever comes back."""
        if self.ntotal == 0 or (allowed is not None and len(allowed) == 0):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        top_k = max(1, min(top_k, self.ntotal))
        if self.kind == "binary":
            wanted = candidates_wanted(top_k, self.rescore_multiplier, self.ntotal)
            _, ids = self.candidates(query, wanted, allowed)
            return rescored(query, ids, self.float_vectors(ids), top_k)
        params = None
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)) if allowed is not None else None
        if self.kind == "ivf":
            nprobe = self.nprobe
            if allowed is not None and len(allowed) * 10 < self.ntotal:
                nprobe = self.nlist  # a narrow filter: scan every list; only allowed ids cost a distance
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist), sel=sel)
        elif sel is not None:
            params = faiss.SearchParameters(sel=sel)

        def search(width: int) -> tuple[np.ndarray, np.ndarray]:
            scores, ids = self.index.search(query, width, params=params)
            keep = ids[0] >= 0
            return scores[0][keep], ids[0][keep]

        return search_ranked(search, top_k, self.ntotal if allowed is None else min(self.ntotal, len(allowed)))
