"""Gunicorn's target: ``web.wsgi:application()`` builds one app per worker.

The app (and its client) is built after the fork, in the worker: Gunicorn
does not preload it, so the master never maps a segment or imports torch.
"""

from __future__ import annotations

import os
import threading
import time

from loguru import logger

from compat.fallback import make_client
from shm_protocol.config import Settings
from shm_protocol.errors import ShmEmbedError
from shm_protocol.logs import configure_logging

from .scaling import BusyMeter

_state: dict = {}


def application():
    """Build this worker's app (called by Gunicorn in the worker)."""
    from .app import create_app

    settings = Settings.from_env(os.environ)
    configure_logging(settings, component="web")
    client = make_client(settings)
    _state["client"] = client
    app = create_app(client, settings)
    _state["ctx"] = app.ctx
    _state["meter"] = BusyMeter(client.publish_load)  # into this worker's ring, for the master's scaler
    return app


def request_started() -> None:
    """A request starts in this worker (Gunicorn's pre_request)."""
    meter = _state.get("meter")
    if meter is not None:
        meter.begin()


def request_finished() -> None:
    """A request of this worker is done (Gunicorn's post_request)."""
    meter = _state.get("meter")
    if meter is not None:
        meter.end()


def attach() -> None:
    """Attach to the sidecar now rather than on the first request (post_worker_init)."""
    client = _state.get("client")
    if client is None:
        return
    try:
        info = client.info()
        logger.info("worker {} attached: {} on {}", os.getpid(), info["model"], info["device"])
    except ShmEmbedError as exc:
        logger.warning("worker {} starts without a sidecar ({}); it will attach on a later request",
                       os.getpid(), exc)
        return
    ctx = _state.get("ctx")
    if ctx is not None:
        threading.Thread(target=_warm, args=(ctx,), name="shm-embed-warm", daemon=True).start()


def _warm(ctx) -> None:
    """Load every collection's index in the background, before the first search needs it."""
    try:
        t0 = time.perf_counter()
        n = ctx.retrieval.warm()
        if n:
            logger.info("worker {} loaded {} passages of collections in {:.1f} s", os.getpid(), n,
                        time.perf_counter() - t0)
    except Exception as exc:  # a warm-up that fails only means the first search loads
        logger.warning("loading collections at start failed: {}", exc)


def shutdown() -> None:
    """Release this worker's ring (worker_exit)."""
    client = _state.pop("client", None)
    if client is not None:
        client.close()
