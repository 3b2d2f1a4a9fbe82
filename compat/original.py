"""The original system's retrieval calls, which took no client: each looks up
this process's shared one (:func:`compat.fallback.get_embedding_model`, the
sidecar's client or the local-model fallback) when none is given, then runs
the corrected implementation (:mod:`compat.index`,
:mod:`retrieval.websearch.websearch`), which takes the client as an argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retrieval.websearch.websearch import MAX_PAGE_CHARS, WebSearchResult
from retrieval.websearch.websearch import web_search_with_embeddings as _web_search

from . import index as _index
from .fallback import get_embedding_model
from .index import VectorIndex


def build_vector_index(docs: Sequence[str], urls: Sequence[str | None] | None = None,
                       metadata: Sequence[dict | None] | None = None, *, client=None) -> VectorIndex:
    """:func:`compat.index.build_vector_index`, with this process's client unless ``client`` is given."""
    return _index.build_vector_index(docs, urls, metadata, client=client or get_embedding_model())


def search_index(query: str, index, metadata: Any = None, top_k: int = 3, *, client=None) -> list[dict]:
    """:func:`compat.index.search_index`, with this process's client unless ``client`` is
    given or ``index`` was built with one."""
    if client is None and getattr(index, "client", None) is None:
        client = get_embedding_model()
    return _index.search_index(query, index, metadata, top_k, client=client)


def web_search_with_embeddings(query: str, urls: list[str] | None = None, *, client=None,
                               **options) -> WebSearchResult:
    """:func:`retrieval.websearch.websearch.web_search_with_embeddings`, with this
    process's client unless ``client`` is given; unpacks as the original's ``(text, urls)``."""
    return _web_search(query, urls, client=client or get_embedding_model(), **options)


def fast_web_search_with_embeddings(search_query: str, model=None, max_concurrent: int = 5,
                                    max_chars: int = MAX_PAGE_CHARS) -> WebSearchResult:
    """The original's variant that was handed a model: the same search,
    embedding with ``model`` (a client, or anything with ``embed``)."""
    return web_search_with_embeddings(search_query, client=model, max_concurrent=max_concurrent,
                                      max_chars=max_chars)
