"""The OpenAPI 3.1 document of the app, rendered from the operations its
responders declare (web.schema), and the interactive docs (Swagger UI,
its files served from the swagger-ui-py package: no CDN).

Routes are added through a :class:`RouteTable`, which refuses a responder
without its Operation; the document lists every route of that table, so it
lists every route the app serves, with the bodies the code checks.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import falcon
from falcon.routing import map_http_methods

from shm_protocol import __version__
from shm_protocol.config import Settings

from .errors import APIError, UndeclaredRoute
from .schema import Operation, Reply, obj

#: What each error status means, for every operation that may answer it.
ERROR_STATUSES = {
    400: "The body is not UTF-8 JSON.",
    401: "The API key is missing or wrong (SHM_EMBED_API_KEY).",
    404: "No such route, model, collection or document.",
    405: "The route does not take this method.",
    409: "The collection exists with other options.",
    413: "Over a limit: the body's bytes or JSON values, the number of inputs, an input's characters or tokens.",
    415: "The body is not application/json.",
    422: "A field is missing or wrong: the message names it and what it accepts.",
    429: "The sidecar's rings are full: retry after Retry-After seconds.",
    500: "An internal error (the server's log has the details).",
    502: "The web search endpoint failed.",
    503: "The sidecar or the collection store is unavailable, or the worker is reading other large bodies: "
         "retry after Retry-After seconds.",
}
#: The statuses a route taking a JSON body may answer for its body alone.
BODY_ERRORS = (400, 413, 415, 422, 503)
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
ERROR_SCHEMA = obj({"error": obj({
    "type": {"type": "string", "description": "invalid_request_error, request_too_large, rate_limited, "
             "service_unavailable, authentication_error, not_found, conflict, internal_error..."},
    "message": {"type": "string", "description": "What went wrong, in words."},
    "code": {"type": ["string", "null"], "description": "OpenAI's error code, where one applies (model_not_found)."},
    "param": {"type": ["string", "null"], "description": "The field the code is about."},
}, required=["type", "message"])})
TAGS = (
    ("embeddings", "Vectors of texts, in OpenAI's and text-embeddings-inference's shapes."),
    ("rerank", "Cross-encoder scores of (query, document) pairs, best first."),
    ("classify", "Sequence classifiers' label scores of texts or pairs."),
    ("models", "The models the sidecar serves."),
    ("collections", "Stored documents, split into passages and searched by their vectors."),
    ("web search", "Pages fetched and ranked against a query."),
    ("operations", "Health, readiness, counters and metrics."),
    ("docs", "This document and the interactive page that reads it."),
)
_PARAM = re.compile(r"{(\w+)}")


class RouteTable:
    """The app's routes, each added with the Operation of each of its
    responders (what :func:`document` renders and the tests walk)."""

    def __init__(self, app: falcon.App):
        self.app = app
        self.entries: list[tuple[str, str, Operation]] = []  # (URI template, method, operation)

    def add(self, template: str, resource, *, suffix: str | None = None) -> None:
        for method, responder in sorted(map_http_methods(resource, suffix=suffix).items()):
            operation = getattr(responder, "operation", None)
            if not isinstance(operation, Operation):
                raise UndeclaredRoute(f"{method} {template}: {type(resource).__name__}.{responder.__name__} "
                                      "declares no Operation (see docs/http-api-openapi.md)")
            missing = set(_PARAM.findall(template)) - set(operation.params)
            if missing:
                raise UndeclaredRoute(f"{method} {template}: no description of {', '.join(sorted(missing))}")
            self.entries.append((template, method, operation))
        self.app.add_route(template, resource, suffix=suffix)

    def open_routes(self) -> set[tuple[str, str]]:
        """(URI template, method) of every operation served without the API key."""
        return {(template, method) for template, method, op in self.entries if op.open}


def document(routes: RouteTable, settings: Settings) -> dict:
    """The OpenAPI 3.1 document of ``routes``, with the limits of ``settings``."""
    secured = bool(settings.api_key)
    paths: dict[str, dict] = {}
    for template, method, op in routes.entries:
        paths.setdefault(template, {})[method.lower()] = _operation(template, method, op, settings, secured)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "shm-embed", "version": __version__,
                 "description": "Embeddings, reranking, classification, collections and web search, served by a "
                                "sidecar that shares memory with the web workers. Every error answers the same JSON "
                                "shape (components.schemas.Error)."},
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"apiKey": {
                "type": "http", "scheme": "bearer",
                "description": "The service's SHM_EMBED_API_KEY, as 'Authorization: Bearer <key>'; asked for "
                               "only when the service has one."}},
        },
    }
    if secured:
        doc["security"] = [{"apiKey": []}]
    return doc


def _operation(template: str, method: str, op: Operation, settings: Settings, secured: bool) -> dict:
    out: dict = {"operationId": re.sub(r"\W+", "_", f"{method} {template}").strip("_").lower(),
                 "summary": op.summary, "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    names = _PARAM.findall(template)
    if names:
        out["parameters"] = [{"name": name, "in": "path", "required": True, "description": op.params[name][0],
                              "schema": {"type": "string"}, "example": op.params[name][1]} for name in names]
    if op.body is not None:
        out["requestBody"] = {"required": not op.body.optional, "content": {"application/json": {
            "schema": op.body.schema(settings), "example": op.body.example}}}
    responses = {str(reply.status): _reply(reply) for reply in op.replies}
    errors = set(op.errors) | {500}
    if op.body is not None:
        errors |= set(BODY_ERRORS)
    if secured and not op.open:
        errors.add(401)
    for status in sorted(errors - {reply.status for reply in op.replies}):
        responses[str(status)] = {
            "description": ERROR_STATUSES[status],
            **({"headers": RETRY_AFTER} if status in (429, 503) else {}),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    out["responses"] = responses
    if secured and op.open:
        out["security"] = []
    return out


def _reply(reply: Reply) -> dict:
    schema = reply.schema if reply.media_type == "application/json" else {"type": "string"}
    return {"description": reply.description, "content": {reply.media_type: {"schema": schema}}}


# --- the document and the interactive docs, served ------------------------------------------

OPENAPI = Operation(summary="This OpenAPI 3.1 document", tag="docs", open=True,
                    replies=(Reply("The document.", {"type": "object"}),))
DOCS = Operation(summary="Interactive docs (Swagger UI) of this document", tag="docs", open=True,
                 replies=(Reply("The page.", media_type="text/html"),), errors=(404,))
DOCS_ASSET = Operation(summary="A file of the interactive docs (from the swagger-ui-py package)", tag="docs",
                       open=True, params={"asset": ("The file's name.", "swagger-ui.css")},
                       replies=(Reply("The file.", media_type="application/octet-stream"),), errors=(404,))
#: The files of Swagger UI the page loads, with their media types: nothing else is served.
ASSETS = {"swagger-ui.css": "text/css; charset=utf-8",
          "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
          "favicon-32x32.png": "image/png"}
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>shm-embed API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
</script>
</body>
</html>
"""


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files in the swagger-ui-py package (not imported), or None without it."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


class OpenAPIDocument:
    """GET /openapi.json: rendered once, when the app is made."""

    def __init__(self):
        self.body = b""

    @OPENAPI
    def on_get(self, req, resp):
        resp.data = self.body
        resp.content_type = falcon.MEDIA_JSON


class Docs:
    """GET /docs (the page) and /docs/assets/{asset} (Swagger UI's files)."""

    def __init__(self):
        self.folder = swagger_ui_dir()

    def _folder(self) -> Path:
        if self.folder is None or not self.folder.is_dir():
            raise APIError(falcon.HTTP_404, "not_found", "interactive docs need the swagger-ui-py package; "
                                                          "/openapi.json is served without it")
        return self.folder

    @DOCS
    def on_get(self, req, resp):
        self._folder()
        resp.text = DOCS_PAGE
        resp.content_type = falcon.MEDIA_HTML

    @DOCS_ASSET
    def on_get_asset(self, req, resp, asset: str):
        media_type = ASSETS.get(asset)
        if media_type is None:
            raise APIError(falcon.HTTP_404, "not_found", f"no docs asset {asset!r}")
        path = self._folder() / asset
        resp.set_stream(path.open("rb"), path.stat().st_size)
        resp.content_type = media_type
        resp.cache_control = ["public", "max-age=86400"]


def add_routes(routes: RouteTable) -> OpenAPIDocument:
    """The document's and the docs' routes; the document is set once every route is added."""
    spec = OpenAPIDocument()
    routes.add("/openapi.json", spec)
    docs = Docs()
    routes.add("/docs", docs)
    routes.add("/docs/assets/{asset}", docs, suffix="asset")
    return spec


__all__ = ["ERROR_STATUSES", "RouteTable", "add_routes", "document"]
