"""The Falcon app, built by :func:`create_app` from its dependencies (a
client and the settings), so tests build it with what they need and
Gunicorn builds it once per worker after the fork.

The resources live by area: web.embeddings, web.rerank, web.classify, web.models,
web.operations, web.collections_api, web.websearch_api, and web.openapi
(the document and the docs); each declares its operations (web.schema),
which validate its bodies and make the OpenAPI document.
"""

from __future__ import annotations

import falcon
from falcon.routing import CompiledRouter

from shm_protocol.client import EmbeddingBackend
from shm_protocol.config import Settings

from . import cohere, collections_api, errors, openapi, status, tokens
from .classify import Classify, Predict
from .context import Context, dump_json
from .embeddings import Embed, OpenAIEmbeddings
from .middleware import AuthMiddleware, RequestIdMiddleware
from .models import Models
from .operations import EmbeddingHealth, EmbeddingStats, Health, Info, Metrics, Ready
from .rerank import CohereRerank, Rerank
from .websearch_api import WebSearch


def create_app(client: EmbeddingBackend, settings: Settings) -> RequestIdMiddleware:
    """The WSGI app for ``client``: the sidecar's EmbeddingClient, the local
    fallback, or (in the unit tests) a fake with the same interface. Its
    ``falcon_app``, ``routes`` (web.openapi.RouteTable) and ``ctx`` are
    there for Gunicorn's hooks and the tests."""
    ctx = Context(client, settings)
    router = CompiledRouter()
    app = falcon.App(router=router)
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = falcon.media.JSONHandler(dumps=dump_json)
    errors.install(app)
    routes = openapi.RouteTable(app)
    routes.add("/v1/embeddings", OpenAIEmbeddings(ctx))
    routes.add("/embed", Embed(ctx))
    routes.add("/rerank", Rerank(ctx))
    routes.add("/v1/rerank", CohereRerank(ctx))
    routes.add("/predict", Predict(ctx))
    routes.add("/classify", Classify(ctx))
    models = Models(ctx)
    routes.add("/v1/models", models)
    routes.add("/v1/models/{model_id}", models, suffix="item")
    routes.add("/health", Health())
    routes.add("/ready", Ready(ctx))
    routes.add("/info", Info(ctx))
    routes.add("/embedding/health", EmbeddingHealth(ctx))
    routes.add("/embedding/stats", EmbeddingStats(ctx))
    routes.add("/metrics", Metrics(ctx))
    ctx.retrieval = collections_api.add_routes(routes, ctx)
    routes.add("/search/web", WebSearch(ctx))
    status.add_routes(routes, ctx)
    tokens.add_routes(routes, ctx)
    cohere.add_routes(routes, ctx)
    spec = openapi.add_routes(routes)
    spec.body = dump_json(openapi.document(routes, settings))
    app.add_middleware(AuthMiddleware(settings.api_key, router, routes.open_routes()))
    wrapped = RequestIdMiddleware(app)
    wrapped.ctx = ctx
    wrapped.routes = routes
    return wrapped


__all__ = ["create_app"]
