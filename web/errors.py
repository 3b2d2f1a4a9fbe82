"""Errors of the HTTP layer and the mapping of client errors to HTTP.

Every error answers ``{"error": {"type": ..., "message": ...}}``; the mapping
from shm_protocol's typed errors lives here alone.
"""

from __future__ import annotations

import falcon
from loguru import logger

from retrieval.errors import (
    CollectionConflict,
    CollectionNotFound,
    SearchBackendFailed,
    StorageBusy,
    StorageUnavailable,
)
from shm_protocol.errors import (
    ConfigError,
    InvalidInput,
    LayoutMismatch,
    ModelFailed,
    ModelNotFound,
    NoRingAvailable,
    RequestTooLarge,
    RingFull,
    ShmEmbedError,
    SidecarUnavailable,
    SlotRejected,
)
from shm_protocol.logs import RateLimitedLog


class APIError(falcon.HTTPError):
    """An HTTP error with a machine-readable type."""

    def __init__(self, status, error_type: str, message: str, *, headers: dict | None = None,
                 code: str | None = None, param: str | None = None):
        super().__init__(status, title=error_type, description=message, headers=headers)
        self.error_type = error_type
        self.code, self.param = code, param  # OpenAI's error fields, where one applies

    def to_dict(self, obj_type=dict):
        body = {"type": self.error_type, "message": self.description}
        if self.code is not None:
            body.update(code=self.code, param=self.param)
        return {"error": body}


class UndeclaredRoute(TypeError):
    """A route's responder was added without its Operation (web.schema): the
    app would serve what its OpenAPI document does not describe."""


def model_not_found(requested: str, served: list[str], message: str | None = None) -> APIError:
    """OpenAI's answer to a model it does not serve."""
    return APIError(falcon.HTTP_404, "invalid_request_error",
                    message or f"The model '{requested}' does not exist here; this service serves "
                               f"{', '.join(repr(n) for n in served)}",
                    code="model_not_found", param="model")


def bad_request(message: str) -> APIError:
    return APIError(falcon.HTTP_400, "invalid_request_error", message)


def unprocessable(message: str) -> APIError:
    return APIError(falcon.HTTP_422, "invalid_request_error", message)


def too_large(message: str) -> APIError:
    return APIError(falcon.HTTP_413, "request_too_large", message)


def unavailable(message: str, retry_after: int = 1) -> APIError:
    return APIError(falcon.HTTP_503, "service_unavailable", message, headers={"Retry-After": str(retry_after)})


#: What a client is told about an unavailable sidecar, by the kind of
#: reason; the reason itself (pids, namespace, segment names) goes to the log.
_SIDECAR_STATES = (
    (("timeout",), "the embedding sidecar did not answer in time"),
    (("absent", "dead", "gone"), "the embedding sidecar is not running"),
    (("heartbeat", "wedged", "no progress", "hung"), "the embedding sidecar is not responding"),
    (("starting", "creating"), "the embedding sidecar is starting"),
    (("draining", "stopping", "stopped", "shutdown", "handed_over"), "the embedding sidecar is stopping or restarting"),
)
_log_unavailable = RateLimitedLog()


def sidecar_unavailable_message(exc: Exception) -> str:
    """A client-facing sentence for an unavailable sidecar; the details are
    logged (rate-limited) with the request's id."""
    detail = f"{getattr(exc, 'reason', '')} {exc}".lower()
    _log_unavailable("WARNING", "embedding sidecar unavailable: {}", exc)
    for words, message in _SIDECAR_STATES:
        if any(w in detail for w in words):
            return message
    return "the embedding sidecar is unavailable"


def _serialize(req, resp, exc: falcon.HTTPError) -> None:
    """Every HTTPError, ours or Falcon's own (404, 405...), in one JSON shape."""
    if isinstance(exc, APIError):
        body = exc.to_dict()
    else:
        kind = exc.title.lower().replace(" ", "_") if exc.title else "error"
        body = {"error": {"type": kind, "message": exc.description or exc.title or str(exc.status)}}
    resp.media = body
    resp.content_type = falcon.MEDIA_JSON


def _handle_shm_error(req, resp, exc: ShmEmbedError, params) -> None:
    if isinstance(exc, RingFull):
        raise APIError(falcon.HTTP_429, "rate_limited", str(exc),
                       headers={"Retry-After": str(max(1, round(exc.retry_after_s)))})
    if isinstance(exc, NoRingAvailable):
        _log_unavailable("WARNING", "no ring for this worker: {}", exc)
        raise unavailable("the embedding sidecar has no ring free for this worker")
    if isinstance(exc, SidecarUnavailable):
        raise unavailable(sidecar_unavailable_message(exc))
    if isinstance(exc, LayoutMismatch):
        logger.error("sidecar and workers speak different layouts: {}", exc)
        raise unavailable("the embedding sidecar runs another version of this service", retry_after=5)
    if isinstance(exc, CollectionNotFound):
        raise APIError(falcon.HTTP_404, "not_found", str(exc))
    if isinstance(exc, CollectionConflict):
        raise APIError(falcon.HTTP_409, "conflict", str(exc))
    if isinstance(exc, StorageBusy):
        raise unavailable(str(exc))
    if isinstance(exc, StorageUnavailable):  # the SQLite error and the path are in the log, not the answer
        raise unavailable(f"collection store unavailable: {exc.reason}", retry_after=max(1, round(exc.retry_after_s)))
    if isinstance(exc, SearchBackendFailed):
        raise APIError(falcon.HTTP_502, "bad_gateway", str(exc))
    if isinstance(exc, RequestTooLarge):
        raise too_large(str(exc))
    if isinstance(exc, ModelNotFound):
        if not exc.requested:  # no model named, and none of the kind asked for is served
            raise unprocessable(str(exc))
        raise model_not_found(exc.requested, exc.served, str(exc))
    if isinstance(exc, InvalidInput):
        raise unprocessable(str(exc))
    if isinstance(exc, (ModelFailed, SlotRejected, ConfigError)):
        logger.error("embedding failed: {}", exc)
        raise APIError(falcon.HTTP_500, "internal_error", "embedding failed (see the server log)")
    logger.exception("unexpected shm-embed error")
    raise APIError(falcon.HTTP_500, "internal_error", "internal error (see the server log)")


def _handle_unexpected(req, resp, exc: Exception, params) -> None:
    if isinstance(exc, falcon.HTTPError):
        raise exc
    logger.exception("unhandled error on {} {}", req.method, req.path)
    raise APIError(falcon.HTTP_500, "internal_error", "internal error (see the server log)")


def install(app: falcon.App) -> None:
    app.set_error_serializer(_serialize)
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(ShmEmbedError, _handle_shm_error)
