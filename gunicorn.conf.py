"""Gunicorn settings for the shm-embed web service.

Flat settings read from the environment, then hooks. The app is built in
each worker after the fork (no preload): the master never keeps a segment
mapped (it maps the control segment for a moment to check the rings, to
release a dead worker's ring, and once a second to read the workers' load
when they scale), starts no thread and never touches CUDA. It only imports
the web code and loads the tokenizer before forking, so the workers share
those pages.
"""

import os

from shm_protocol.config import Settings

# The WSGI target: one Falcon app per worker, built by a factory.
wsgi_app = "web.wsgi:application()"
# Where to listen (SHM_EMBED_BIND, default 127.0.0.1:8000).
bind = os.environ.get("SHM_EMBED_BIND", "127.0.0.1:8000")
# Worker processes at start: WEB_MIN_WORKERS (default WEB_CONCURRENCY, itself
# min(4, 2 x cores + 1)); each leases one ring of the sidecar. Up to
# WEB_MAX_WORKERS under load (web/scaling.py, installed in when_ready).
workers = Settings.from_env(os.environ).worker_range[0]
# Threads per worker: requests of one worker use different slots of its ring.
worker_class = os.environ.get("WEB_WORKER_CLASS", "gthread")
threads = int(os.environ.get("WEB_THREADS", "4"))
# Never preload: the app and its client belong to the worker.
preload_app = False
# A request waits at most the client's timeout; give the worker room beyond it.
timeout = int(os.environ.get("WEB_TIMEOUT", "60"))
graceful_timeout = int(os.environ.get("WEB_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
# Recycle a worker after this many requests (0: never), with jitter so they do not all go at once.
max_requests = int(os.environ.get("WEB_MAX_REQUESTS", "0"))
max_requests_jitter = max_requests // 4
accesslog = None  # the app logs one line per request with its request id
errorlog = "-"
loglevel = os.environ.get("SHM_EMBED_LOG_LEVEL", "info").lower()
proc_name = "shm-embed-web"
# No control socket: several deployments (and tests) share a host, and nothing here uses it.
control_socket_disable = True


def on_starting(server):
    """In the master, before the first fork: import what every worker
    imports and load the models' tokenizers, so the workers share those pages
    copy-on-write (a worker's PSS 37 -> 18 MiB) instead of each making its own.
    Refuses to start when the sidecar's rings cannot cover WEB_MAX_WORKERS.
    Nothing here keeps a segment mapped, imports torch or starts a thread:
    numpy's BLAS is held to one thread (the web workers leave the cores to
    the sidecar anyway)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from shm_protocol.errors import ConfigError
    from web.scaling import check_rings

    try:
        check_rings(Settings.from_env(os.environ))
    except ConfigError as exc:
        raise RuntimeError(str(exc)) from None  # Gunicorn prints "Error: ..." and exits 1
    import web.app  # noqa: F401
    import web.wsgi  # noqa: F401
    from shm_protocol import hotpath

    hotpath.load()  # a build that cannot load stops the service here, naming the fix, not in every request
    from shm_protocol.model_files import model_specs, tokenizer_file
    from shm_protocol.tokenizer import preload_tokenizer

    try:
        for spec in model_specs(Settings.from_env(os.environ)):
            preload_tokenizer(str(tokenizer_file(spec.path)))
    except Exception as exc:  # the workers load them themselves, as the sidecar names them
        server.log.warning("tokenizer not preloaded: %s", exc)


def when_ready(server):
    """In the master, once it listens: workers follow the load when
    WEB_MAX_WORKERS is above WEB_MIN_WORKERS (web/scaling.py)."""
    settings = Settings.from_env(os.environ)
    fewest, most = settings.worker_range
    if most > fewest:
        from web.scaling import Scaler

        Scaler.install(server, settings)


def post_worker_init(worker):
    """Attach this worker to the sidecar (lease a ring) before its first request."""
    from web.wsgi import attach

    attach()


def pre_request(worker, req):
    """Count the request in progress, for the master's scaler."""
    from web.wsgi import request_started

    request_started()


def post_request(worker, req, environ, resp):
    """The request is done (answered or failed)."""
    from web.wsgi import request_finished

    request_finished()


def worker_exit(server, worker):
    """Release the worker's ring on a clean exit."""
    from web.wsgi import shutdown

    shutdown()


def child_exit(server, worker):
    """In the master: a worker died (maybe killed); mark its ring orphaned so
    the sidecar reclaims it now, even if the pid is reused. Maps the control
    segment only for this call."""
    from shm_protocol.config import Settings
    from shm_protocol.region import release_rings_of
    from shm_protocol.segments import Names

    settings = Settings.from_env(os.environ)
    released = release_rings_of(Names(settings.namespace), worker.pid)
    if released:
        server.log.info("released %d ring(s) of dead worker %s", released, worker.pid)
