"""Retrieval on top of the sidecar: in-memory indexes in a worker, vector
collections shared by every worker of the host, and web search ranked by
embeddings. Importing it does not import torch; FAISS and lxml are imported
when a name that needs them is first used."""

from importlib import import_module

_WHERE = {
    "generate_embeddings": "compat.fallback", "get_active_operations_count": "compat.fallback",
    "get_embedding_client": "compat.fallback", "get_embedding_model": "compat.fallback",
    "is_using_ipc_embedding": "compat.fallback",
    "VectorIndex": ".index", "build_vector_index": ".index", "search_index": ".index",
    "CollectionOptions": ".documents", "CollectionStore": ".store",
    "WebSearchResult": ".websearch", "fast_web_search_with_embeddings": ".websearch",
    "web_search_with_embeddings": ".websearch",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
