"""Errors of collections and web search. Each derives from
:class:`shm_protocol.errors.ShmEmbedError`, so a caller catches every
shm-embed error with one class; web/errors.py maps each to its HTTP status."""

from __future__ import annotations

from shm_protocol.errors import ShmEmbedError


class CollectionNotFound(ShmEmbedError, LookupError):
    """No collection (or no document of a collection) has that name or id."""


class CollectionConflict(ShmEmbedError):
    """The collection exists with another model, dimension or options than asked."""


class FetchRefused(ShmEmbedError):
    """The page fetcher will not reach that address (not public, not allowed by configuration)."""


class FetchFailed(ShmEmbedError):
    """A page could not be fetched or read (the message says why)."""


class SearchBackendFailed(ShmEmbedError):
    """The configured search endpoint failed or answered something unreadable."""


class StorageBusy(ShmEmbedError):
    """The collection store stayed locked by other writers past its timeout."""


class StorageUnavailable(ShmEmbedError):
    """The collection store cannot be read or written: its database is
    corrupt, its disk is full, its file cannot be opened. ``reason`` is the
    short cause a client may see ("the database is corrupt"); the message
    has the details (the SQLite error, the path) for the log."""

    def __init__(self, message: str, *, reason: str, retry_after_s: float = 30.0):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
