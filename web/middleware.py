"""The API key check and the request id, around every request."""

from __future__ import annotations

import hmac
import time
import uuid

import falcon
from loguru import logger

from . import errors, intake


class AuthMiddleware:
    """Bearer-token check when SHM_EMBED_API_KEY is set. A route's method
    declared ``open`` (web.schema.Operation) is served without it:
    ``open_routes`` holds those as (URI template, method), found through the
    app's own ``router`` before anything else runs (an unknown path is a 401
    too, as any other, so nobody learns which routes exist without the key)."""

    def __init__(self, api_key: str, router, open_routes: set[tuple[str, str]]):
        self.key = api_key.encode()
        self.router = router
        self.open_routes = open_routes

    def process_request(self, req, resp):
        if not self.key:
            return
        route = self.router.find(req.path)
        if route is not None and (route[3], req.method) in self.open_routes:
            return
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise errors.APIError(falcon.HTTP_401, "authentication_error", "missing or wrong API key",
                                  headers={"WWW-Authenticate": "Bearer"})


class RequestIdMiddleware:
    """WSGI wrapper: an X-Request-ID in and out, bound to every log line of
    the request, and one access-log line per request."""

    def __init__(self, app: falcon.App):
        self.app = app
        self.ctx = None  # the app's web.context.Context, for Gunicorn's hooks
        self.falcon_app = app
        self.routes = None  # the app's web.openapi.RouteTable

    def __call__(self, environ, start_response):
        rid = environ.get("HTTP_X_REQUEST_ID", "")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = uuid.uuid4().hex
        status_box = []

        def start(status, headers, exc_info=None):
            status_box.append(status)
            headers.append(("X-Request-ID", rid))
            return start_response(status, headers, exc_info)

        t0 = time.perf_counter()
        with logger.contextualize(request_id=rid):
            result = self.app(environ, start)
            intake.drain_body(environ)
            logger.info("{} {} {} {:.1f}ms", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                        status_box[0].split()[0] if status_box else "-", (time.perf_counter() - t0) * 1e3)
        return result
