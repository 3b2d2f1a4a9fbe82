"""Typed errors of the shm-embed protocol and worker client.

Every error a caller can see derives from :class:`ShmEmbedError`, so
``except ShmEmbedError`` catches all of them. The web layer maps them to HTTP
statuses; nothing here knows about HTTP.
"""

from __future__ import annotations


class ShmEmbedError(Exception):
    """Base class of every shm-embed error."""


class ConfigError(ShmEmbedError, ValueError):
    """A setting is missing, malformed or out of range."""


class LayoutMismatch(ShmEmbedError):
    """The segment has another magic, protocol version or layout than this code."""

    def __init__(self, message: str, *, found: int | None = None, expected: int | None = None):
        super().__init__(message)
        self.found = found
        self.expected = expected


class SidecarUnavailable(ShmEmbedError):
    """No live sidecar serves this namespace (absent, dead, stopped, restarted or hung)."""

    def __init__(self, message: str, *, reason: str = "unavailable"):
        super().__init__(message)
        self.reason = reason


class SidecarTimeout(SidecarUnavailable):
    """The sidecar is alive but did not answer within the request timeout."""

    def __init__(self, message: str):
        super().__init__(message, reason="timeout")


class NamespaceInUse(ShmEmbedError):
    """Another live sidecar already serves this namespace."""


class ShmSpaceError(ShmEmbedError):
    """/dev/shm has too little free space for the namespace's objects."""

    def __init__(self, message: str, *, needed: int, free: int):
        super().__init__(message)
        self.needed = needed
        self.free = free


class RingTableBusy(SidecarUnavailable):
    """The ring-table lock stayed held past its timeout (its holder is stopped or hung)."""

    def __init__(self, message: str):
        super().__init__(message, reason="ring table locked")


class NoRingAvailable(ShmEmbedError):
    """Every ring of the namespace is leased to a live process."""


class RingFull(ShmEmbedError):
    """Every slot of this process's ring stayed busy for the whole admission wait."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestCancelled(ShmEmbedError):
    """The request's caller gave up (an asyncio await was cancelled): its
    slots were handed back or abandoned, as after a timeout."""


class RequestTooLarge(ShmEmbedError, ValueError):
    """The request exceeds a configured limit (texts per request, tokens per text)."""

    def __init__(self, message: str, *, limit: int, actual: int, what: str):
        super().__init__(message)
        self.limit = limit
        self.actual = actual
        self.what = what


class InvalidInput(ShmEmbedError, TypeError):
    """The call's arguments are of the wrong type (e.g. a non-string text)."""


class ModelNotFound(InvalidInput):
    """The call named a model the sidecar does not serve, or one that does
    not do what was asked (embedding with a reranker, or the reverse)."""

    def __init__(self, message: str, *, requested: str, served: list[str]):
        super().__init__(message)
        self.requested = requested
        self.served = served


class SlotRejected(ShmEmbedError):
    """The sidecar refused this request's slot (the code says why)."""

    def __init__(self, message: str, *, code: int):
        super().__init__(message)
        self.code = code


class ModelFailed(SlotRejected):
    """The model raised while embedding this batch (e.g. out of memory)."""


class HotPathUnavailable(ShmEmbedError):
    """The compiled hot path (shm_protocol._hotpath) cannot be loaded, or was
    built from other sources than this layout: rebuild it (pip install -e .)."""
