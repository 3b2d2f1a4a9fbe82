"""shm-embed's shared-memory protocol: layout, segments and the worker client.

Importing this package never imports torch or falcon.
"""

from .aio import AsyncEmbeddingClient
from .client import EmbeddingClient, EmbedResult, RerankResult
from .config import Settings
from .errors import (
    ConfigError,
    InvalidInput,
    LayoutMismatch,
    ModelFailed,
    ModelNotFound,
    NamespaceInUse,
    NoRingAvailable,
    RequestCancelled,
    RequestTooLarge,
    RingFull,
    ShmEmbedError,
    SidecarTimeout,
    SidecarUnavailable,
    SlotRejected,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncEmbeddingClient", "EmbeddingClient", "EmbedResult", "RerankResult", "Settings", "ConfigError",
    "InvalidInput", "LayoutMismatch", "ModelFailed", "ModelNotFound", "NamespaceInUse", "NoRingAvailable",
    "RequestCancelled", "RequestTooLarge", "RingFull", "ShmEmbedError", "SidecarTimeout", "SidecarUnavailable",
    "SlotRejected", "__version__",
]
