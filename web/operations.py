"""Operations: /health, /ready, /info, the original system's /embedding/health
and /embedding/stats, and Prometheus' /metrics."""

from __future__ import annotations

import falcon

from shm_protocol import __version__
from shm_protocol.errors import ShmEmbedError
from shm_protocol.model_files import served_models

from . import errors
from .errors import unavailable
from .metrics import make_registry, render
from .schema import BOOLEAN, INTEGER, NUMBER, STRING, Operation, Reply, array, obj

HEALTH = Operation(
    summary="Liveness: the web worker answers (open without the API key)",
    tag="operations",
    replies=(Reply("Always, while the worker runs.", obj({"status": {"const": "ok"}})),),
    open=True,
)

READY = Operation(
    summary="Readiness: the sidecar serves and the collection store can be read",
    tag="operations",
    replies=(Reply("Ready.", obj({"status": {"const": "ready"}, "model": STRING, "device": STRING,
                                  "store": STRING})),),
    errors=(503,),
)

INFO = Operation(
    summary="The served models, the device, the version and the request limits",
    tag="operations",
    replies=(Reply("What this service runs.", obj({
        "model": STRING, "dimension": INTEGER, "max_tokens": {"type": ["integer", "null"]},
        "models": array(obj({"name": STRING, "kind": STRING, "dimension": INTEGER},
                            additionalProperties=True)),
        "device": STRING, "dtype": STRING, "version": STRING, "mode": {"enum": ["ipc", "local"]},
        "cache": obj({"enabled": BOOLEAN}, additionalProperties=True),
        "limits": obj({"max_inputs": INTEGER, "max_input_chars": INTEGER, "max_body_bytes": INTEGER}),
    })),),
    errors=(503,),
)

EMBEDDING_HEALTH = Operation(
    summary="The sidecar's connectivity (kept from the original system)",
    tag="operations",
    replies=(Reply("Connected.", obj({
        "status": {"const": "ok"}, "embedding_server": {"const": "connected"}, "active_operations": INTEGER,
        "ipc_enabled": BOOLEAN, "mode": STRING, "sidecar_pid": INTEGER, "epoch": STRING})),
        Reply("Disconnected.", obj({"status": {"const": "degraded"}, "embedding_server": {"const": "disconnected"},
                                   "error": STRING, "ipc_enabled": BOOLEAN, "mode": STRING}), status=503)),
)

EMBEDDING_STATS = Operation(
    summary="The sidecar's counters, the same from every worker (kept from the original system)",
    tag="operations",
    replies=(Reply("The counters (the stats CLI's fields, and the original system's).", obj({
        "status": {"const": "ok"}, "mode": STRING, "total_requests": INTEGER, "successful_requests": INTEGER,
        "failed_requests": INTEGER, "active_operations": INTEGER, "uptime": NUMBER,
        "worker": obj({"total_requests": INTEGER, "successful_requests": INTEGER, "failed_requests": INTEGER}),
    }, additionalProperties=True)),),
    errors=(503,),
)

METRICS = Operation(
    summary="Prometheus metrics of the whole host",
    tag="operations",
    replies=(Reply("The exposition text.", media_type="text/plain"),),
)


class Health:
    @HEALTH
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class Ready:
    """200 only when the sidecar is alive with its model loaded and the
    collection store (if one was made) can be read."""

    def __init__(self, ctx):
        self.ctx = ctx

    @READY
    def on_get(self, req, resp):
        try:
            info = self.ctx.client.info()
        except ShmEmbedError as exc:
            raise unavailable(f"not ready: {errors.sidecar_unavailable_message(exc)}") from None
        store_ok, store = self.ctx.retrieval.store_status()
        if not store_ok:
            raise unavailable(f"not ready: {store}", retry_after=5)
        resp.media = {"status": "ready", "model": info["model"], "device": info["device"], "store": store}


class Info:
    def __init__(self, ctx):
        self.ctx = ctx

    @INFO
    def on_get(self, req, resp):
        info = self.ctx.client.info()
        settings = self.ctx.settings
        resp.media = {
            "model": info["model"], "dimension": info["dimension"], "max_tokens": info["max_seq_length"],
            "models": served_models(info),
            "device": info["device"], "dtype": info.get("dtype", "float32"), "version": __version__,
            "mode": self.ctx.mode, "cache": info.get("cache", {"enabled": False}),
            "limits": {"max_inputs": settings.max_inputs, "max_input_chars": settings.max_input_chars,
                       "max_body_bytes": settings.max_body_bytes},
        }


class EmbeddingHealth:
    """Kept from the original system: sidecar connectivity."""

    def __init__(self, ctx):
        self.ctx = ctx

    @EMBEDDING_HEALTH
    def on_get(self, req, resp):
        mode = self.ctx.mode
        try:
            snap = self.ctx.client.stats()
        except ShmEmbedError as exc:
            resp.status = falcon.HTTP_503
            resp.media = {"status": "degraded", "embedding_server": "disconnected",
                          "error": errors.sidecar_unavailable_message(exc),
                          "ipc_enabled": self.ctx.settings.use_ipc, "mode": mode}
            return
        resp.media = {"status": "ok", "embedding_server": "connected",
                      "active_operations": snap.busy_slots + snap.queue_depth,
                      "ipc_enabled": self.ctx.settings.use_ipc, "mode": mode,
                      "sidecar_pid": snap.sidecar_pid, "epoch": snap.epoch}


class EmbeddingStats:
    """Kept from the original system, now the sidecar's own counters (the same from every worker)."""

    def __init__(self, ctx):
        self.ctx = ctx

    @EMBEDDING_STATS
    def on_get(self, req, resp):
        try:
            snap = self.ctx.client.stats()
        except ShmEmbedError as exc:
            raise unavailable(f"sidecar stats unavailable: {errors.sidecar_unavailable_message(exc)}") from None
        body = snap.as_dict()
        counters = snap.counters
        body.update({
            "status": "ok",
            "ipc_mode": self.ctx.mode == "ipc",
            "mode": self.ctx.mode,
            "server_address": f"shm:/{snap.namespace}",
            "active_operations": snap.busy_slots + snap.queue_depth,
            "total_requests": counters["requests"] + sum(snap.errors.values()),
            "successful_requests": counters["requests"],
            "failed_requests": sum(snap.errors.values()),
            "uptime": snap.uptime_s,
            "worker": dict(self.ctx.counts),
        })
        resp.media = body


class Metrics:
    def __init__(self, ctx):
        self.registry = make_registry(ctx.client.stats, __version__)

    @METRICS
    def on_get(self, req, resp):
        resp.data = render(self.registry)
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
