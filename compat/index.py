"""In-memory indexes in a worker: the original ``build_vector_index`` and
``search_index``, done right. Both embed through the client they are given
(:mod:`compat.original` looks the process's client up for the original's
calls, which passed none).

Vectors are normalised and searched by inner product, so ``score`` is a cosine
similarity, highest first (the original returned L2 distances labelled as
relevance). Asking for more results than there are documents returns every
document once (the original let FAISS's ``-1`` filler through and returned the
last document again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.faiss_index import PassageIndex
from shm_protocol.errors import InvalidInput

#: Characters of a document the ``content`` field of a result shows (as the original did).
PREVIEW_CHARS = 500


@dataclass
class VectorIndex:
    """Documents, their vectors and their FAISS index. Unpacks as the
    original's ``(index, embeddings, metadata)`` tuple."""

    index: PassageIndex
    embeddings: np.ndarray
    metadata: list[dict] = field(default_factory=list)
    client: Any = None

    def __len__(self) -> int:
        return len(self.metadata)

    def __iter__(self):
        return iter((self, self.embeddings, self.metadata))

    def search(self, query: str, top_k: int = 3, *, client=None) -> list[dict]:
        return search_index(query, self, top_k=top_k, client=client)


def _client(client):
    if client is None:
        raise InvalidInput("no embedding client: pass client=, or use compat.original, which looks it up")
    return client


def build_vector_index(docs: Sequence[str], urls: Sequence[str | None] | None = None,
                       metadata: Sequence[dict | None] | None = None, *, client) -> VectorIndex:
    """Embed ``docs`` with ``client`` (one batched call through the sidecar)
    into an exact cosine index. ``urls`` and ``metadata``, when given, run parallel to ``docs``."""
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise InvalidInput("docs must be a list of strings")
    docs = list(docs)
    for name, extra in (("urls", urls), ("metadata", metadata)):
        if extra is not None and len(extra) != len(docs):
            raise InvalidInput(f"{name} has {len(extra)} entries for {len(docs)} docs")
    client = _client(client)
    vectors = (client.embed(docs, normalize=True) if docs
               else np.empty((0, client.dimension), np.float32))
    index = PassageIndex(vectors.shape[1])
    index.add(np.arange(len(docs), dtype=np.int64), vectors)
    meta = []
    for i, text in enumerate(docs):
        entry = {
            "id": i,
            "url": urls[i] if urls is not None else None,
            "content": text[:PREVIEW_CHARS] + ("..." if len(text) > PREVIEW_CHARS else ""),
            "full_content": text,
            "length": len(text),
        }
        if metadata is not None and metadata[i]:
            entry["metadata"] = dict(metadata[i])
        meta.append(entry)
    return VectorIndex(index, vectors, meta, client)


def search_index(query: str, index, metadata: Any = None, top_k: int = 3, *, client=None) -> list[dict]:
    """The ``top_k`` documents closest to ``query``, best first, each its
    metadata entry plus ``score`` (cosine similarity), ``relevance_score``
    (the same number, under the original's name) and ``rank`` (1 is best).

    The query is embedded with ``client``, else with the client ``index``
    was built with. Called as ``search_index(query, index, top_k=3)`` with a
    :class:`VectorIndex`, or the original way, ``search_index(query, index,
    metadata, top_k)``, with the first and last items of its tuple."""
    if isinstance(metadata, int) and not isinstance(metadata, bool):
        metadata, top_k = None, metadata
    if not isinstance(index, VectorIndex):
        if isinstance(index, PassageIndex) and metadata is not None:
            index = VectorIndex(index, np.empty((0, index.dim), np.float32), list(metadata))
        else:
            raise InvalidInput("index must be what build_vector_index returned")
    elif metadata is not None:
        index = VectorIndex(index.index, index.embeddings, list(metadata), index.client)
    if not isinstance(query, str):
        raise InvalidInput("query must be a string")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidInput("top_k must be a positive integer")
    if len(index) == 0:
        return []
    qv = _client(client or index.client).embed([query], normalize=True)[0]
    scores, ids = index.index.search(qv, min(top_k, len(index)))
    out = []
    for rank, (score, i) in enumerate(zip(scores.tolist(), ids.tolist()), start=1):
        entry = dict(index.metadata[i])
        entry.update(score=float(score), relevance_score=float(score), rank=rank)
        out.append(entry)
    return out
