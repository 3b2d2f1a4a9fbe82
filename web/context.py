"""What every resource shares (:class:`Context`) and how answers are written (:func:`dump_json`)."""

from __future__ import annotations

import time

import falcon
import numpy as np
import orjson

from shm_protocol.config import Settings
from shm_protocol.errors import ShmEmbedError
from shm_protocol.text import mend

from . import intake


class Context:
    """What every resource shares: the client, the settings, per-worker counts."""

    def __init__(self, client, settings: Settings):
        self.client = client
        self.settings = settings
        self.body_budget = intake.BodyBudget(settings.max_inflight_body_bytes)
        self.started = time.time()
        self.counts = {"total_requests": 0, "successful_requests": 0, "failed_requests": 0}
        self.retrieval = None  # the collections' shared parts (web.collections_api.Retrieval), set by create_app

    @property
    def mode(self) -> str:
        """Who serves embeddings now: "ipc" (the sidecar) or "local" (the fallback's own model)."""
        return getattr(self.client, "mode", "ipc")

    def read_json(self, req: falcon.Request) -> dict:
        """The request body as a JSON object, within the limits of the API (see intake.read_json)."""
        return intake.read_json(req, self.settings, self.body_budget)

    def embed(self, texts: list[str], *, truncate: bool | None = None, normalize: bool = False, **options):
        """Embed through the client under this request's token budget;
        ``options``: prompt, prompt_name, dimensions, model, and
        truncation_direction, chunk (web.long_inputs; ``truncate`` None:
        SHM_EMBED_LONG_INPUTS decides)."""
        self.counts["total_requests"] += 1
        try:
            res = self.client.embed_detailed(texts, truncate=truncate, normalize=normalize,
                                             max_tokens=self.settings.max_request_tokens, **options)
        except ShmEmbedError:
            self.counts["failed_requests"] += 1
            raise
        self.counts["successful_requests"] += 1
        return res

    def rerank(self, query: str, documents: list[str], **options):
        """Rerank through the client under this request's token budget;
        ``options``: model, raw_scores, truncate, prompt, prompt_name (the
        cross-encoder's prompt goes before the query)."""
        self.counts["total_requests"] += 1
        try:
            res = self.client.rerank_detailed(query, documents, max_tokens=self.settings.max_request_tokens,
                                              **options)
        except ShmEmbedError:
            self.counts["failed_requests"] += 1
            raise
        self.counts["successful_requests"] += 1
        return res


    def classify(self, inputs: list, **options):
        """Classify through the client under this request's token budget;
        ``inputs``: texts and (text, text_pair) tuples; ``options``: model,
        raw_scores, truncate."""
        self.counts["total_requests"] += 1
        try:
            res = self.client.classify_detailed(inputs, max_tokens=self.settings.max_request_tokens, **options)
        except ShmEmbedError:
            self.counts["failed_requests"] += 1
            raise
        self.counts["successful_requests"] += 1
        return res


def _json_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dump_json(obj) -> bytes:
    """Responses as JSON. orjson writes float32 vectors straight from numpy
    with the shortest text that reads back as the same float32: 384 numbers
    take about 13 us instead of 240 us through ``json`` (which writes each
    as a 17-digit double), and the body is about half the size."""
    try:
        return orjson.dumps(obj, default=_json_default, option=_DUMP_OPTIONS)
    except orjson.JSONEncodeError:
        # Half a character stored before text was checked (see shm_protocol.text):
        # written as U+FFFD rather than failing every answer that holds it.
        return orjson.dumps(mend(obj), default=_json_default, option=_DUMP_OPTIONS)


_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
