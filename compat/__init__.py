"""The original system's surface, kept working beside the protocol package:
its module-level API (``get_embedding_client``, ``get_embedding_model``,
``is_using_ipc_embedding``, ``generate_embeddings``,
``get_active_operations_count``), its local-model fallback
(``USE_IPC_EMBEDDING=false``, ``SHM_EMBED_FALLBACK=local``), and its
retrieval calls (``build_vector_index``, ``search_index``,
``web_search_with_embeddings``, ``fast_web_search_with_embeddings``), which
look the process's client up when they are given none.

The fallback is the one place a worker may import torch, and only when it
must; ``shm_protocol`` itself never does. Importing this package imports
nothing else: each name is imported when it is first used."""

from importlib import import_module

_WHERE = {
    "generate_embeddings": ".fallback", "get_active_operations_count": ".fallback",
    "get_embedding_client": ".fallback", "get_embedding_model": ".fallback",
    "is_using_ipc_embedding": ".fallback",
    "VectorIndex": ".index", "build_vector_index": ".original", "search_index": ".original",
    "web_search_with_embeddings": ".original", "fast_web_search_with_embeddings": ".original",
    "WebSearchResult": "retrieval.websearch.websearch",
    "CollectionOptions": "retrieval.collections.documents", "CollectionStore": "retrieval.collections.store",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'compat' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
