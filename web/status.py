"""The live status page: GET /status (one self-contained HTML page) and the
JSON it polls every second, GET /status.json.

Both sit behind the API key like every route but /health: a browser reaches
them through the front proxy, which adds the ``Authorization`` header (see
docs/status-and-scaling.md); the page itself never holds the key. The JSON
carries the figures /metrics exports, as cumulative counters and histogram
buckets with the server's clock: the page derives rates and windowed
quantiles from two polls, so any worker can answer any poll.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time

from shm_protocol.errors import ShmEmbedError
from shm_protocol.layout import BATCH_TEXTS_BUCKETS, LATENCY_BUCKETS_S

from .errors import sidecar_unavailable_message
from .schema import BOOLEAN, NUMBER, Operation, Reply, obj
from .status_page import PAGE

STATUS_PAGE = Operation(
    summary="The live status page: charts of the figures /metrics has, redrawn every second",
    tag="operations",
    replies=(Reply("One self-contained HTML page (no external assets).", media_type="text/html"),),
)

STATUS_JSON = Operation(
    summary="The figures the status page polls: counters, histograms, queue, rings, models, cache",
    tag="operations",
    replies=(Reply("The sidecar's figures; only its state while it is down.",
                   obj({"time": NUMBER, "sidecar": obj({"up": BOOLEAN}, additionalProperties=True)},
                       additionalProperties=True)),),
)


def status_document(snapshot_fn) -> dict:
    """The status figures from one stats snapshot (``snapshot_fn`` raises
    ShmEmbedError when no sidecar can be read: then only its state)."""
    now = time.time()
    try:
        snap = snapshot_fn()
    except ShmEmbedError as exc:
        return {"time": now, "sidecar": {"up": False, "state": "down", "reason": sidecar_unavailable_message(exc)}}
    up = snap.unavailable is None
    doc = {
        "time": now,
        "sidecar": {"up": up, "state": snap.state if up else "down", "reason": snap.unavailable,
                    "stage": snap.state, "model": snap.model, "device": snap.device, "dtype": snap.dtype,
                    "epoch": snap.epoch, "pid": snap.sidecar_pid, "uptime_s": snap.uptime_s},
        "counters": dict(snap.counters),
        "errors": sum(snap.errors.values()),
        "queue_depth": snap.queue_depth,
        "busy_slots": snap.busy_slots,
        "rings": len(snap.rings),
        "rings_leased": sum(1 for r in snap.rings if r["owner_pid"] > 0),
        "batch_size": {"bounds": list(BATCH_TEXTS_BUCKETS), "counts": snap.batch_texts_hist},
        "queue_seconds": {"bounds": list(LATENCY_BUCKETS_S), "counts": snap.queue_hist},
        "compute_seconds": {"bounds": list(LATENCY_BUCKETS_S), "counts": snap.compute_hist},
        "models": [{k: m[k] for k in ("name", "kind", "dtype", "requests", "texts", "errors")} for m in snap.models],
    }
    cache = snap.cache  # the sidecar's cache figures, when it runs one
    if cache.get("enabled"):
        doc["cache"] = cache
    return doc


def _csp_hash(page: str, tag: str) -> str:
    """The CSP source of the page's one inline ``tag`` element (its sha256)."""
    body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


class StatusPage:
    """GET /status: the page, with a policy that allows its own inline
    script and style and connections to this origin, nothing else."""

    def __init__(self):
        self.body = PAGE.encode()
        self.policy = (f"default-src 'none'; script-src {_csp_hash(PAGE, 'script')}; "
                       f"style-src {_csp_hash(PAGE, 'style')}; connect-src 'self'; base-uri 'none'; "
                       "form-action 'none'; frame-ancestors 'none'")

    @STATUS_PAGE
    def on_get(self, req, resp):
        resp.content_type = "text/html; charset=utf-8"
        resp.data = self.body
        resp.set_header("Content-Security-Policy", self.policy)
        resp.set_header("Cache-Control", "no-store")
        resp.set_header("X-Content-Type-Options", "nosniff")


class StatusJSON:
    """GET /status.json: the figures the page draws (200 also while the sidecar is down)."""

    def __init__(self, ctx):
        self.ctx = ctx

    @STATUS_JSON
    def on_get(self, req, resp):
        resp.media = status_document(self.ctx.client.stats)
        resp.set_header("Cache-Control", "no-store")


def add_routes(routes, ctx) -> None:
    """Add the page and its JSON to ``routes`` (web.openapi.RouteTable)."""
    routes.add("/status", StatusPage())
    routes.add("/status.json", StatusJSON(ctx))
