"""The Falcon app: request parsing and validation, endpoints, errors.

Built by :func:`create_app` from its dependencies (a client and the
settings), so tests build it with what they need and Gunicorn builds it once
per worker after the fork.
"""

from __future__ import annotations

import base64
import hmac
import time
import uuid

import falcon
import numpy as np
import orjson
from loguru import logger

from shm_protocol import __version__
from shm_protocol.client import EmbeddingBackend
from shm_protocol.config import Settings
from shm_protocol.errors import ShmEmbedError
from shm_protocol.model_files import named, served_models
from shm_protocol.text import mend

from . import cohere, errors, intake, tokens
from .errors import too_large, unavailable, unprocessable
from .long_inputs import long_input_options
from .metrics import make_registry, render
from .retrieval import add_routes

OPEN_PATHS = {"/health"}
#: A prompt is prepended to every input of a request: bounded, so that one
#: request cannot multiply its body (2,048 inputs x this, at most).
MAX_PROMPT_CHARS = 2048


class Context:
    """What every resource shares: the client, the settings, per-worker counts."""

    def __init__(self, client, settings: Settings):
        self.client = client
        self.settings = settings
        self.body_budget = intake.BodyBudget(settings.max_inflight_body_bytes)
        self.started = time.time()
        self.counts = {"total_requests": 0, "successful_requests": 0, "failed_requests": 0}

    @property
    def mode(self) -> str:
        """Who serves embeddings now: "ipc" (the sidecar) or "local" (the fallback's own model)."""
        return getattr(self.client, "mode", "ipc")

    def read_json(self, req: falcon.Request) -> dict:
        """The request body as a JSON object, within the limits of the API (see intake.read_json)."""
        return intake.read_json(req, self.settings, self.body_budget)

    def texts(self, value, field: str) -> tuple[list[str], bool]:
        """Validate a string-or-list-of-strings field; returns (texts, was_single)."""
        if isinstance(value, str):
            texts, single = [value], True
        elif isinstance(value, list):
            if not value:
                raise unprocessable(f"'{field}' must not be an empty list")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or any(
                isinstance(v, list) for v in value
            ):
                raise unprocessable(
                    f"'{field}' as token arrays is not supported: send strings. (LangChain's OpenAIEmbeddings "
                    "sends tiktoken ids, which are not this model's tokens, unless it is created with "
                    "check_embedding_ctx_length=False.)")
            bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
            if bad is not None:
                raise unprocessable(f"'{field}[{bad}]' must be a string, not {type(value[bad]).__name__}")
            texts, single = value, False
        else:
            raise unprocessable(f"'{field}' must be a string or a list of strings")
        s = self.settings
        if len(texts) > s.max_inputs:
            raise too_large(f"{len(texts)} inputs is over the limit of {s.max_inputs} (SHM_EMBED_MAX_INPUTS)")
        for i, t in enumerate(texts):
            if len(t) > s.max_input_chars:
                raise too_large(f"input {i} has {len(t)} characters, over the limit of {s.max_input_chars} "
                                "(SHM_EMBED_MAX_INPUT_CHARS)")
        return texts, single

    def embed(self, texts: list[str], *, truncate: bool | None = True, normalize: bool = False, **options):
        """Embed through the client under this request's token budget;
        ``options``: prompt, prompt_name, dimensions, model (see text_options),
        truncation_direction, chunk (see long_input_options)."""
        self.counts["total_requests"] += 1
        try:
            res = self.client.embed_detailed(texts, truncate=truncate, normalize=normalize,
                                             max_tokens=self.settings.max_request_tokens, **options)
        except ShmEmbedError:
            self.counts["failed_requests"] += 1
            raise
        self.counts["successful_requests"] += 1
        return res

    def rerank(self, query: str, documents: list[str], **options):
        """Rerank through the client under this request's token budget;
        ``options``: model, raw_scores, truncate, prompt, prompt_name (the
        cross-encoder's prompt goes before the query)."""
        self.counts["total_requests"] += 1
        try:
            res = self.client.rerank_detailed(query, documents, max_tokens=self.settings.max_request_tokens,
                                              **options)
        except ShmEmbedError:
            self.counts["failed_requests"] += 1
            raise
        self.counts["successful_requests"] += 1
        return res


def _json_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dump_json(obj) -> bytes:
    """Responses as JSON. orjson writes float32 vectors straight from numpy
    with the shortest text that reads back as the same float32: 384 numbers
    take about 13 us instead of 240 us through ``json`` (which writes each
    as a 17-digit double), and the body is about half the size."""
    try:
        return orjson.dumps(obj, default=_json_default, option=_DUMP_OPTIONS)
    except orjson.JSONEncodeError:
        # Half a character stored before text was checked (see shm_protocol.text):
        # written as U+FFFD rather than failing every answer that holds it.
        return orjson.dumps(mend(obj), default=_json_default, option=_DUMP_OPTIONS)


_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def prompt_options(doc: dict) -> dict:
    """The request's prompt and prompt_name, type-checked (the client checks
    them against the model: an unknown prompt name is a 422 too)."""
    out = {}
    for key in ("prompt", "prompt_name"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise unprocessable(f"'{key}' must be a string")
        out[key] = value
    if out["prompt"] is not None and len(out["prompt"]) > MAX_PROMPT_CHARS:
        raise too_large(f"'prompt' has {len(out['prompt'])} characters, over the limit of {MAX_PROMPT_CHARS}")
    return out


def text_options(doc: dict) -> dict:
    """The request's prompt, prompt_name (prompt_options) and dimensions, type-checked."""
    out = prompt_options(doc)
    dims = doc.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
        raise unprocessable("'dimensions' must be an integer")
    out["dimensions"] = dims
    out["model"] = model_field(doc)
    return out


def _bool(doc: dict, key: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise unprocessable(f"'{key}' must be true or false")
    return value


class OpenAIEmbeddings:
    """POST /v1/embeddings, as the OpenAI API and its clients speak it."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc = self.ctx.read_json(req)
        if "input" not in doc:
            raise unprocessable("'input' is required")
        texts, _ = self.ctx.texts(doc["input"], "input")
        fmt = doc.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise unprocessable("'encoding_format' must be 'float' or 'base64'")
        options = text_options(doc)
        # With dimensions, vectors are cut and made unit length again, as OpenAI's are.
        res = self.ctx.embed(texts, normalize=options["dimensions"] is not None, **options)
        data = []
        for i, vec in enumerate(res.vectors):
            if fmt == "base64":
                emb = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = vec  # float32, written by dump_json
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = res.total_tokens
        resp.media = {"object": "list", "data": data, "model": res.model or self.ctx.client.info()["model"],
                      "usage": {"prompt_tokens": n, "total_tokens": n}}


class Models:
    """GET /v1/models and /v1/models/{model_id}, in OpenAI's shape, one
    card per served model (the default first)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def _cards(self) -> list[dict]:
        return [{"id": m["name"], "object": "model", "created": int(self.ctx.started), "owned_by": "shm-embed",
                 "kind": m["kind"], "dimension": m["dimension"], "max_tokens": m["max_seq_length"]}
                for m in served_models(self.ctx.client.info())]

    def on_get(self, req, resp, model_id: str | None = None):
        cards = self._cards()
        if model_id is None:
            resp.media = {"object": "list", "data": cards}
            return
        card = named(cards, model_id, lambda c: c["id"])
        if card is None:
            raise errors.model_not_found(model_id, [c["id"] for c in cards])
        resp.media = card


def model_field(doc: dict) -> str | None:
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise unprocessable("'model' must be a string")
    return model


def _documents(ctx: Context, value, field: str) -> list[str]:
    """A rerank request's documents: strings, or objects with a "text" (Cohere's form)."""
    if isinstance(value, list):
        value = [v["text"] if isinstance(v, dict) and isinstance(v.get("text"), str) else v for v in value]
    texts, single = ctx.texts(value, field)
    if single:
        raise unprocessable(f"'{field}' must be a list")
    return texts


def _rerank_body(ctx: Context, req, field: str) -> tuple[dict, str, list[str]]:
    """A rerank request's body, its query and its documents (under ``field``),
    each within the limits of any input."""
    doc = ctx.read_json(req)
    query = doc.get("query")
    if not isinstance(query, str) or not query:
        raise unprocessable("'query' must be a non-empty string")
    ctx.texts([query], "query")
    if field not in doc:
        raise unprocessable(f"'{field}' is required")
    return doc, query, _documents(ctx, doc[field], field)


class Rerank:
    """POST /rerank in text-embeddings-inference's shape: {"query", "texts",
    "raw_scores", "return_text", "truncate", "model", "prompt", "prompt_name"}
    -> [{"index", "score", "text"?}], best first."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc, query, texts = _rerank_body(self.ctx, req, "texts")
        res = self.ctx.rerank(query, texts, model=model_field(doc), raw_scores=_bool(doc, "raw_scores", False),
                              truncate=_bool(doc, "truncate", True), **prompt_options(doc))
        with_text = _bool(doc, "return_text", False)
        order = np.argsort(-res.scores, kind="stable")
        resp.media = [{"index": int(i), "score": float(res.scores[i]), **({"text": texts[i]} if with_text else {})}
                      for i in order]


class CohereRerank:
    """POST /v1/rerank in Cohere's and Jina's shape: {"model", "query",
    "documents" (strings or {"text"}), "top_n", "return_documents", "prompt",
    "prompt_name"} -> {"results": [{"index", "relevance_score", "document"?}],
    best first}."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc, query, texts = _rerank_body(self.ctx, req, "documents")
        top_n = doc.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise unprocessable("'top_n' must be a positive integer")
        with_docs = _bool(doc, "return_documents", False)
        res = self.ctx.rerank(query, texts, model=model_field(doc), truncate=_bool(doc, "truncate", True),
                              **prompt_options(doc))
        order = np.argsort(-res.scores, kind="stable")[: top_n or len(texts)]
        results = [{"index": int(i), "relevance_score": float(res.scores[i]),
                    **({"document": {"text": texts[i]}} if with_docs else {})} for i in order]
        resp.media = {"id": uuid.uuid4().hex, "model": res.model, "results": results,
                      "usage": {"total_tokens": res.total_tokens},
                      "meta": {"billed_units": {"search_units": 1}}}


class Embed:
    """POST /embed: {"inputs": str | [str], "normalize": bool, "truncate": bool, "truncation_direction":
    "right" | "left", "chunk": bool, "prompt": str, "prompt_name": str, "dimensions": int} -> [[float]]."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc = self.ctx.read_json(req)
        if "inputs" not in doc:
            raise unprocessable("'inputs' is required")
        texts, _ = self.ctx.texts(doc["inputs"], "inputs")
        normalize = _bool(doc, "normalize", True)
        res = self.ctx.embed(texts, normalize=normalize, **long_input_options(doc), **text_options(doc))
        resp.media = res.vectors  # float32 (n, dim), written by dump_json


class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


class Ready:
    """200 only when the sidecar is alive with its model loaded and the
    collection store (if one was made) can be read."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

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
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_get(self, req, resp):
        info = self.ctx.client.info()
        s = self.ctx.settings
        resp.media = {
            "model": info["model"], "dimension": info["dimension"], "max_tokens": info["max_seq_length"],
            "models": served_models(info),
            "device": info["device"], "dtype": info.get("dtype", "float32"), "version": __version__,
            "mode": self.ctx.mode,
            "limits": {"max_inputs": s.max_inputs, "max_input_chars": s.max_input_chars,
                       "max_body_bytes": s.max_body_bytes},
        }


class EmbeddingHealth:
    """Kept from the original system: sidecar connectivity."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

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

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def on_get(self, req, resp):
        try:
            snap = self.ctx.client.stats()
        except ShmEmbedError as exc:
            raise unavailable(f"sidecar stats unavailable: {errors.sidecar_unavailable_message(exc)}") from None
        d = snap.as_dict()
        c = snap.counters
        d.update({
            "status": "ok",
            "ipc_mode": self.ctx.mode == "ipc",
            "mode": self.ctx.mode,
            "server_address": f"shm:/{snap.namespace}",
            "active_operations": snap.busy_slots + snap.queue_depth,
            "total_requests": c["requests"] + sum(snap.errors.values()),
            "successful_requests": c["requests"],
            "failed_requests": sum(snap.errors.values()),
            "uptime": snap.uptime_s,
            "worker": dict(self.ctx.counts),
        })
        resp.media = d


class Metrics:
    def __init__(self, ctx: Context):
        self.registry = make_registry(ctx.client.stats, __version__)

    def on_get(self, req, resp):
        resp.data = render(self.registry)
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"


class AuthMiddleware:
    """Bearer-token check when SHM_EMBED_API_KEY is set."""

    def __init__(self, api_key: str):
        self.key = api_key.encode()

    def process_request(self, req, resp):
        if not self.key or req.path in OPEN_PATHS:
            return
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            raise errors.APIError(falcon.HTTP_401, "authentication_error", "missing or wrong API key",
                                  headers={"WWW-Authenticate": "Bearer"})


def create_app(client: EmbeddingBackend, settings: Settings) -> falcon.App:
    """The WSGI app for ``client``: the sidecar's EmbeddingClient, the local
    fallback, or (in the unit tests) a fake with the same interface."""
    ctx = Context(client, settings)
    app = falcon.App(middleware=[AuthMiddleware(settings.api_key)])
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = falcon.media.JSONHandler(dumps=dump_json)
    errors.install(app)
    app.add_route("/v1/embeddings", OpenAIEmbeddings(ctx))
    app.add_route("/embed", Embed(ctx))
    app.add_route("/rerank", Rerank(ctx))
    app.add_route("/v1/rerank", CohereRerank(ctx))
    models = Models(ctx)
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id}", models)
    app.add_route("/health", Health())
    app.add_route("/ready", Ready(ctx))
    app.add_route("/info", Info(ctx))
    app.add_route("/embedding/health", EmbeddingHealth(ctx))
    app.add_route("/embedding/stats", EmbeddingStats(ctx))
    app.add_route("/metrics", Metrics(ctx))
    ctx.retrieval = add_routes(app, ctx)
    tokens.add_routes(app, ctx)
    cohere.add_routes(app, ctx)
    wrapped = RequestIdMiddleware(app)
    wrapped.ctx = ctx
    return wrapped


class RequestIdMiddleware:
    """WSGI wrapper: an X-Request-ID in and out, bound to every log line of
    the request, and one access-log line per request."""

    def __init__(self, app: falcon.App):
        self.app = app
        self.ctx: Context | None = None

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


__all__ = ["create_app"]
