"""Retrieval on top of the sidecar: in-memory indexes in a worker, vector
collections shared by every worker of the host, and web search ranked by
embeddings. Importing it does not import torch."""

from shm_protocol.fallback import (
    generate_embeddings,
    get_active_operations_count,
    get_embedding_client,
    get_embedding_model,
    is_using_ipc_embedding,
)

from .index import VectorIndex, build_vector_index, search_index
from .store import CollectionOptions, CollectionStore
from .websearch import WebSearchResult, web_search_with_embeddings

__all__ = [
    "CollectionOptions", "CollectionStore", "VectorIndex", "WebSearchResult", "build_vector_index",
    "generate_embeddings", "get_active_operations_count", "get_embedding_client", "get_embedding_model",
    "is_using_ipc_embedding", "search_index", "web_search_with_embeddings",
]
