"""An asyncio client: the calls of :class:`.client.EmbeddingClient`, awaited.

Why threads and not an eventfd: the sidecar wakes a waiting worker by
posting the slot's POSIX named semaphore (see :mod:`shm_protocol.layout`),
and a POSIX semaphore has no file descriptor an event loop could watch. An
eventfd would need a second wake-up path in the sidecar for asyncio workers
only (and a helper thread per worker anyway to turn semaphore posts into
fd events). So each call runs the synchronous client, tokenizing included,
in a small executor of this client's own, with as many threads as the
ring has slots (the sidecar's ``SHM_EMBED_SLOTS_PER_RING``): more threads than slots would
only wait for a slot, and the loop's default executor is left to the
application. The waits release the GIL (the compiled hot path), so the
event loop keeps running while they block.

Cancellation: a cancelled ``await`` sets the call's cancel event
(:func:`.session.cancellable`). A call still queued never starts; a call in
flight ends its wait at the next wake-up (within 50 ms) with
RequestCancelled, and its slots are given up the way a timeout gives them
up: a slot the sidecar never saw is free at once, one it holds is skipped
by the sidecar (the slot's ``cancel`` field) and taken again once it is
done. No slot leaks and the ring never waits for an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from .classify import ClassifyResult
from .client import EmbeddingClient, EmbedResult, RerankResult
from .config import Settings
from .errors import RequestCancelled, SidecarUnavailable
from .session import cancellable

__all__ = ["AsyncEmbeddingClient"]

T = TypeVar("T")


class AsyncEmbeddingClient:
    """Get embeddings, rerank and label scores from the namespace's sidecar without
    blocking the event loop. Arguments, results and errors are those of
    :class:`EmbeddingClient`; only the waiting differs.

    >>> async with await AsyncEmbeddingClient.connect() as client:
    ...     vectors = await client.embed(["hello world"])

    One per process (it leases one ring, like the synchronous client); any
    task of the process may call it concurrently.
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.sync = EmbeddingClient(self.settings)
        self._threads = self.settings.slots_per_ring
        self._executor = self._new_executor(self._threads)
        self._closed = False

    @staticmethod
    def _new_executor(threads: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shm-embed-wait")

    @classmethod
    async def connect(cls, settings: Settings | None = None, *, lazy: bool = False) -> AsyncEmbeddingClient:
        """A client for the namespace in ``settings`` (default: from the
        environment). Unless ``lazy``, attach now (SidecarUnavailable when no
        sidecar serves); a lazy client attaches on its first call."""
        client = cls(settings)
        if not lazy:
            try:
                info = await client._call(client.sync.info)
            except BaseException:
                await client.close()
                raise
            # The sidecar fixed the ring's size at its start: one thread per slot it made.
            if info["slots_per_ring"] != client._threads:
                old, client._threads = client._executor, info["slots_per_ring"]
                client._executor = client._new_executor(client._threads)
                old.shutdown(wait=False)
        return client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in this client's executor, cancellable (see the module docstring)."""
        if self._closed:
            raise SidecarUnavailable("client is closed", reason="closed")
        cancel = threading.Event()

        def job() -> T:
            if cancel.is_set():  # cancelled while queued
                raise RequestCancelled("the caller cancelled the request")
            with cancellable(cancel):
                return fn(*args, **kwargs)

        future = self._executor.submit(job)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            future.cancel()
            raise

    # -- the calls of EmbeddingClient -------------------------------------------------
    async def embed(self, texts: Sequence[str], *, truncate: bool = True, normalize: bool = False,
                    prompt: str | None = None, prompt_name: str | None = None,
                    dimensions: int | None = None, model: str | None = None) -> np.ndarray:
        """Vectors of ``texts`` (float32, one row per text, in order): :meth:`EmbeddingClient.embed`."""
        return await self._call(self.sync.embed, texts, truncate=truncate, normalize=normalize, prompt=prompt,
                                prompt_name=prompt_name, dimensions=dimensions, model=model)

    async def embed_detailed(self, texts: Sequence[str], **options: Any) -> EmbedResult:
        """Vectors and details: :meth:`EmbeddingClient.embed_detailed`, same keywords."""
        return await self._call(self.sync.embed_detailed, texts, **options)

    async def rerank(self, query: str, documents: Sequence[str], *, model: str | None = None,
                     raw_scores: bool = False, truncate: bool = True, prompt: str | None = None,
                     prompt_name: str | None = None) -> np.ndarray:
        """Scores of ``documents`` for ``query``: :meth:`EmbeddingClient.rerank`."""
        return await self._call(self.sync.rerank, query, documents, model=model, raw_scores=raw_scores,
                                truncate=truncate, prompt=prompt, prompt_name=prompt_name)

    async def rerank_detailed(self, query: str, documents: Sequence[str], **options: Any) -> RerankResult:
        """Scores and details: :meth:`EmbeddingClient.rerank_detailed`, same keywords."""
        return await self._call(self.sync.rerank_detailed, query, documents, **options)

    async def classify(self, inputs: Sequence, *, model: str | None = None, raw_scores: bool = False,
                       truncate: bool = True) -> list[list[dict]]:
        """Per input, every label with its score, best first: :meth:`EmbeddingClient.classify`."""
        return await self._call(self.sync.classify, inputs, model=model, raw_scores=raw_scores, truncate=truncate)

    async def classify_detailed(self, inputs: Sequence, **options: Any) -> ClassifyResult:
        """Label scores and details: :meth:`EmbeddingClient.classify_detailed`, same keywords."""
        return await self._call(self.sync.classify_detailed, inputs, **options)

    async def info(self) -> dict:
        """What :meth:`EmbeddingClient.info` reports (attaching first if needed)."""
        return await self._call(self.sync.info)

    # -- closing ----------------------------------------------------------------------
    async def close(self) -> None:
        """Hand the ring back (once calls still running have left) and stop the
        executor's threads. The client cannot be used after."""
        if self._closed:
            return
        self._closed = True
        # Calls still queued run and fail with SidecarUnavailable (closed); running ones finish first.
        self.sync.close()
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
