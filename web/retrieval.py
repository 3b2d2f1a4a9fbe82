"""HTTP resources of collections and web search (see the README's HTTP API).

The collection store is opened on first use in each worker (after Gunicorn's
fork): every worker opens the same database, the SQLite file under
SHM_EMBED_DATA_DIR or the PostgreSQL server of SHM_EMBED_COLLECTIONS_URL, so
all of them (on every host, with PostgreSQL) see the same collections and
every write. FAISS, lxml and the fetcher are imported on first use, so a
worker that serves only embeddings does not carry them.
"""

from __future__ import annotations

import threading

import falcon

from .errors import too_large, unprocessable


class Retrieval:
    """What the resources share: the store and the fetcher, made lazily."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._lock = threading.Lock()
        self._store = None
        self._fetcher = None

    @property
    def store(self):
        """This worker's CollectionStore."""
        with self._lock:
            if self._store is None:
                from retrieval.collections.store import CollectionStore

                self._store = CollectionStore.from_settings(self.ctx.settings, self.ctx.client)
            return self._store

    @property
    def fetcher(self):
        """This worker's page Fetcher."""
        with self._lock:
            if self._fetcher is None:
                from retrieval.websearch.fetch import Fetcher

                self._fetcher = Fetcher(self.ctx.settings)
            return self._fetcher

    def store_status(self) -> tuple[bool, str]:
        """(True, "ok") when the collection store can be read or was never made,
        (False, reason) when it cannot (a corrupt file, a full disk, a
        PostgreSQL server that is down...): for /ready. Never creates the
        store, imports no FAISS, reads a page or two."""
        from retrieval.collections.factory import location_of, store_status

        return store_status(location_of(self.ctx.settings))

    def warm(self) -> int:
        """Open the store and load every stored collection now; nothing (and no
        import) when no SQLite store was ever made. A PostgreSQL store is
        opened, its schema created or migrated, at every worker's start."""
        from retrieval.collections.factory import location_of, store_exists

        if self._store is None and not store_exists(location_of(self.ctx.settings)):
            return 0
        return self.store.warm()

    def body(self, req, *, optional: bool = False) -> dict:
        if optional and not req.content_length and req.content_type is None:
            return {}
        return self.ctx.read_json(req)


class _Resource:
    """A resource over the shared Retrieval."""

    def __init__(self, r: Retrieval):
        self.r = r

    def query(self, doc: dict) -> str:
        """The body's 'query': a string, within the same limits as any input."""
        query = doc.get("query")
        if not isinstance(query, str):
            raise unprocessable("'query' must be a string")
        self.r.ctx.texts(query, "query")
        return query


def _int(doc: dict, key: str, default: int) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise unprocessable(f"'{key}' must be an integer")
    return value


def rerank_spec(doc: dict) -> dict | None:
    """The body's 'rerank': absent (None), true, or {"model", "top_n"}."""
    spec = doc.get("rerank")
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = {}
    if not isinstance(spec, dict) or set(spec) - {"model", "top_n"}:
        raise unprocessable("'rerank' must be true or an object with 'model' and 'top_n'")
    model, top_n = spec.get("model"), spec.get("top_n")
    if model is not None and not isinstance(model, str):
        raise unprocessable("'rerank.model' must be a string")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise unprocessable("'rerank.top_n' must be a positive integer")
    return {"model": model, "top_n": top_n}


def rerank_results(ctx, query: str, results: list[dict], spec: dict) -> list[dict]:
    """Candidates (each with a 'passage') scored by a cross-encoder against
    ``query``, best first, cut to ``top_n``; each keeps its 'score' and gains
    a 'rerank_score'."""
    if not results:
        return results
    limit = ctx.settings.max_inputs
    if len(results) > limit:  # pairs count as inputs, as on /rerank
        raise too_large(f"{len(results)} candidates to rerank is over the limit of {limit} (SHM_EMBED_MAX_INPUTS); "
                        "ask for fewer (top_k)")
    res = ctx.rerank(query, [r["passage"] for r in results], model=spec["model"])
    for r, score in zip(results, res.scores.tolist()):
        r["rerank_score"] = score
    results = sorted(results, key=lambda r: -r["rerank_score"])
    return results[: spec["top_n"] or len(results)]


class Collections(_Resource):
    """GET /collections."""

    def on_get(self, req, resp):
        resp.media = {"collections": self.r.store.list()}


class Collection(_Resource):
    """PUT, GET and DELETE /collections/{name}."""

    def on_put(self, req, resp, name):
        doc = self.r.body(req, optional=True)
        options = doc["options"] if "options" in doc else (doc or None)  # {"options": {...}} or the options
        info, created = self.r.store.create(name, options)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = info

    def on_get(self, req, resp, name):
        resp.media = self.r.store.info(name)

    def on_delete(self, req, resp, name):
        self.r.store.delete(name)
        resp.media = {"name": name, "deleted": True}


class Documents(_Resource):
    """POST /collections/{name}/documents: add or replace documents by id."""

    def on_post(self, req, resp, name):
        doc = self.r.body(req)
        if "documents" not in doc:
            raise unprocessable("'documents' is required")
        docs = doc["documents"]
        s = self.r.ctx.settings
        if isinstance(docs, list):
            if len(docs) > s.max_inputs:
                raise too_large(f"{len(docs)} documents is over the limit of {s.max_inputs} (SHM_EMBED_MAX_INPUTS)")
            for i, d in enumerate(docs):  # before splitting: a document obeys the per-text limit too
                text = d if isinstance(d, str) else d.get("text") if isinstance(d, dict) else None
                if isinstance(text, str) and len(text) > s.max_input_chars:
                    raise too_large(f"document {i} has {len(text)} characters, over the limit of "
                                    f"{s.max_input_chars} (SHM_EMBED_MAX_INPUT_CHARS)")
        # The request's budget: its passages count as inputs, and their tokens as any request's.
        resp.media = self.r.store.upsert(name, docs, max_passages=s.max_inputs, max_tokens=s.max_request_tokens)


class Document(_Resource):
    """GET and DELETE /collections/{name}/documents/{doc_id}."""

    def on_get(self, req, resp, name, doc_id):
        resp.media = self.r.store.get_document(name, doc_id)

    def on_delete(self, req, resp, name, doc_id):
        self.r.store.delete_document(name, doc_id)
        resp.media = {"id": doc_id, "deleted": True}


class Search(_Resource):
    """POST /collections/{name}/search: {"query", "top_k", "filter", "rerank"} -> {"results": [...]}.
    With 'rerank', the top_k candidates are reranked by a cross-encoder and cut to its top_n."""

    def on_post(self, req, resp, name):
        doc = self.r.body(req)
        query = self.query(doc)
        spec = rerank_spec(doc)
        results = self.r.store.search(name, query, _int(doc, "top_k", 10), doc.get("filter"))
        if spec is not None:
            results = rerank_results(self.r.ctx, query, results, spec)
        resp.media = {"results": results}


class WebSearch(_Resource):
    """POST /search/web: {"query", "urls"?, "top_k"?, "rerank"?} -> {"results", "pages", "failed"}."""

    def on_post(self, req, resp):
        doc = self.r.body(req)
        query = self.query(doc)
        spec = rerank_spec(doc)
        from retrieval.websearch.websearch import web_search_with_embeddings

        result = web_search_with_embeddings(query, doc.get("urls"), top_k=_int(doc, "top_k", 5),
                                            client=self.r.ctx.client, settings=self.r.ctx.settings,
                                            fetcher=self.r.fetcher)
        if spec is not None:
            result.results = rerank_results(self.r.ctx, query, result.results, spec)
        resp.media = result.to_dict()


def add_routes(app: falcon.App, ctx) -> Retrieval:
    r = Retrieval(ctx)
    app.add_route("/collections", Collections(r))
    app.add_route("/collections/{name}", Collection(r))
    app.add_route("/collections/{name}/documents", Documents(r))
    app.add_route("/collections/{name}/documents/{doc_id}", Document(r))
    app.add_route("/collections/{name}/search", Search(r))
    app.add_route("/search/web", WebSearch(r))
    return r
