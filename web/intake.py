"""Request bodies in: their limits (bytes, bytes in flight, JSON values),
their parsing, the one text check every field of every route gets, and the
draining of what a refused request left unread."""

from __future__ import annotations

import contextlib
import json
import re
import threading

import falcon
from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.text import find_broken_text

from . import errors
from .errors import bad_request, too_large, unavailable, unprocessable

JSON_TYPES = ("application/json",)
# A body the app refused unread (413, 415, 401, 404...) is read and dropped
# before the answer goes out, up to this many bytes, so the connection stays
# usable. Gunicorn drains only 64 KiB itself and then closes with bytes
# unread, and the kernel's reset can take the 413 with it before the client
# reads it. Beyond this the connection closes: a client sending that much
# after a refusal gets no better.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_CHUNK = 64 * 1024


class BodyBudget:
    """Request-body bytes this worker holds in reading and parsing, over all
    its threads, bounded: a request that would go over is refused (503 with
    Retry-After) rather than queued, so memory stays bounded and the client
    (or a front proxy) retries where there is room."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, n_bytes: int):
        with self._lock:
            if self.held and self.held + n_bytes > self.limit:
                raise unavailable("the server is reading other large requests; retry shortly")
            self.held += n_bytes
        try:
            yield
        finally:
            with self._lock:
                self.held -= n_bytes


#: A JSON string, quotes included (unrolled: runs of plain bytes in one step).
#: An unclosed one runs to the end of the body, so no match restarts inside
#: it: without that, '"' followed by many '\\"' took quadratic time (1 s for
#: 16 KiB, hours for a MiB). Linear now: a MiB of any mix in under 0.2 s.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
#: Bodies this small cannot amplify into much memory: not counted.
COUNT_VALUES_ABOVE = 64 * 1024
#: The only ways a body that is valid UTF-8 and valid JSON can hold a lone
#: surrogate or U+0000 (JSON allows neither raw control characters nor
#: unescaped surrogates in strings): their escapes. A body without one is
#: not walked at all; a false match (an escaped backslash before "u0000")
#: costs only the walk.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def json_values_upper_bound(raw: bytes) -> int:
    """About how many values a JSON text holds, at least as many as it
    does (each value but the first follows a comma, or opens a container;
    object keys are counted as their values' commas), counted without
    parsing: strings are cut out first so their commas do not count."""
    if len(raw) <= COUNT_VALUES_ABOVE:
        return 0
    bare = _JSON_STRING.sub(b"s", raw)
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1


def _read_at_most(stream, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` bytes of ``stream``, in pieces (a chunked body's reader
    returns what one chunk holds)."""
    parts, got = [], 0
    while got < max_bytes:
        piece = stream.read(min(max_bytes - got, DRAIN_CHUNK * 16))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def read_json(req: falcon.Request, settings: Settings, budget: BodyBudget) -> dict:
    """The request body as a JSON object, with the limits and errors of
    the API. A body with a Content-Length is read up to it; a chunked one
    (no length) is read to its end; either way at most the body limit.
    The bytes are counted against the worker's in-flight budget while
    they are read and parsed, and the body's JSON values are counted
    before parsing, so neither many large bodies at once nor one body of
    tiny values can take the worker's memory. Every string and key of it
    is whole text (check_text): no route sees any other."""
    ctype = (req.content_type or "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise errors.APIError(falcon.HTTP_415, "unsupported_media_type",
                              f"Content-Type must be application/json, not {ctype or 'missing'}")
    limit = settings.max_body_bytes
    declared = req.content_length
    if declared is not None and declared > limit:
        raise too_large(f"body of {declared} bytes is over the limit of {limit} bytes "
                        "(SHM_EMBED_MAX_BODY_BYTES)")
    chunked = declared is None and "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
    reserve = limit if chunked else (declared or 0)
    with budget.hold(reserve):
        stream = req.stream if chunked else req.bounded_stream
        raw = _read_at_most(stream, limit + 1)
        if len(raw) > limit:
            raise too_large(f"body is over the limit of {limit} bytes (SHM_EMBED_MAX_BODY_BYTES)")
        try:
            # UTF-8 only (RFC 8259), checked first: json.loads(bytes) would also take
            # UTF-16 or UTF-32, whose bytes the value count below cannot read.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise bad_request(f"body is not UTF-8: {exc}") from None
        values = json_values_upper_bound(raw)
        if values > settings.max_json_values:
            raise too_large(f"body has about {values} JSON values, over the limit of "
                            f"{settings.max_json_values} (SHM_EMBED_MAX_JSON_VALUES)")
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise bad_request(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise bad_request("body is nested too deeply") from None
        if _SUSPECT_ESCAPE.search(raw):
            check_text(doc)
    if not isinstance(doc, dict):
        raise unprocessable("body must be a JSON object")
    return doc


def check_text(doc) -> None:
    """A 422 naming the first field (a string or a key, at any depth) that
    holds a lone surrogate or U+0000: the stores, the tokenizer and the JSON
    writer take neither, and a route checking only the fields it reads let
    them through to a 500, or into a store where they failed every read."""
    found = find_broken_text(doc)
    if found is not None:
        where, problem = found
        raise unprocessable(f"{where} holds {problem}")


def drain_body(environ) -> None:
    """Read and drop what is left of the request body (see DRAIN_MAX_BYTES)."""
    stream = environ.get("wsgi.input")
    declared = environ.get("CONTENT_LENGTH") or ""
    if stream is None or (declared.isdigit() and int(declared) > DRAIN_MAX_BYTES):
        return
    drained = 0
    try:
        while drained < DRAIN_MAX_BYTES:
            chunk = stream.read(DRAIN_CHUNK)
            if not chunk:
                return
            drained += len(chunk)
    except (OSError, ValueError) as exc:  # the client went away, or sent a malformed chunk
        logger.debug("request body not drained: {}", exc)
