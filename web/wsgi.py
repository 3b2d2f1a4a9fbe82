"""Gunicorn's target: ``web.wsgi:application()`` builds one app per worker.

The app (and its client) is built after the fork, in the worker: Gunicorn
does not preload it, so the master never maps a segment or imports torch.
"""

from __future__ import annotations

import os

from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.errors import ShmEmbedError
from shm_protocol.fallback import make_client
from shm_protocol.logs import configure_logging

_state: dict = {}


def application():
    """Build this worker's app (called by Gunicorn in the worker)."""
    from .app import create_app

    settings = Settings.from_env(os.environ)
    configure_logging(settings, component="web")
    client = make_client(settings)
    _state["client"] = client
    return create_app(client, settings)


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


def shutdown() -> None:
    """Release this worker's ring (worker_exit)."""
    client = _state.pop("client", None)
    if client is not None:
        client.close()
