"""HTTP resources of collections (see docs on the HTTP API): create, list,
delete, add documents, search.

The collection store is opened on first use in each worker (after Gunicorn's
fork): every worker opens the same database, the SQLite file under
SHM_EMBED_DATA_DIR or the PostgreSQL server of SHM_EMBED_COLLECTIONS_URL, so
all of them (on every host, with PostgreSQL) see the same collections and
every write. FAISS is imported on first use, so a worker that serves only
embeddings does not carry it. The store checks options and documents
itself; the bodies here declare them (web.schema) and pass them on.
"""

from __future__ import annotations

import threading

import falcon

from .errors import too_large
from .rerank import RERANK_CANDIDATES, rerank_results
from .schema import (
    INTEGER,
    NUMBER,
    STRING,
    Body,
    Field,
    Integer,
    Operation,
    Passed,
    Reply,
    String,
    array,
    obj,
)


class Retrieval:
    """What the collection resources share: the store, made lazily."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._lock = threading.Lock()
        self._store = None

    @property
    def store(self):
        """This worker's CollectionStore."""
        with self._lock:
            if self._store is None:
                from retrieval.collections.store import CollectionStore

                self._store = CollectionStore.from_settings(self.ctx.settings, self.ctx.client)
            return self._store

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


NAME = {"name": ("The collection's name.", "notes")}
DOC_ID = {"doc_id": ("The document's id.", "doc-1")}
#: Where a collection route goes wrong besides its body: no such collection, the store unavailable.
STORE_ERRORS = (404, 503)
OPTIONS_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "model": {"type": "string", "description": "The embedding model (a served name); default: the default one."},
    "index": {"enum": ["auto", "flat", "ivf"], "description": "auto: exact search until the collection is large, "
              "then IVF; flat: always exact; ivf: IVF once trained."},
    "passage_words": {"type": "integer", "minimum": 8, "maximum": 2000, "description": "Words per passage."},
    "overlap_words": {"type": "integer", "minimum": 0, "description": "Words neighbouring passages share "
                      "(at most half of passage_words)."},
    "query_prompt": {"type": "string", "description": "Put before every query; default: the model's own."},
    "document_prompt": {"type": "string", "description": "Put before every passage; default: the model's own."},
}}
COLLECTION_INFO = obj({"name": STRING, "model": STRING, "dimension": INTEGER, "documents": INTEGER,
                       "passages": INTEGER, "options": {"type": "object"},
                       "index": obj({"kind": {"enum": ["flat", "ivf"]}, "nlist": INTEGER, "nprobe": INTEGER}),
                       "created": NUMBER})
DOCUMENT = obj({"id": STRING, "text": STRING, "url": {"type": ["string", "null"]}, "metadata": {"type": "object"}},
               required=["id", "text"], additionalProperties=True)

LIST_COLLECTIONS = Operation(
    summary="List the collections", tag="collections",
    replies=(Reply("Every collection's description.", obj({"collections": array(COLLECTION_INFO)})),),
    errors=(503,))
CREATE_COLLECTION = Operation(
    summary="Create a collection (or find it, when it exists with the same options)", tag="collections",
    description="The body may be left out (the default options), or give the options at its top level "
                "instead of under 'options'.",
    body=Body((Field("options", Passed(OPTIONS_SCHEMA), "The collection's options, fixed at creation."),),
              example={"options": {"index": "flat"}}, optional=True),
    params=NAME,
    replies=(Reply("Created.", COLLECTION_INFO, status=201),
             Reply("It existed, with the same options.", COLLECTION_INFO)),
    errors=(404, 409, 503))
GET_COLLECTION = Operation(summary="Describe a collection", tag="collections", params=NAME,
                           replies=(Reply("The collection.", COLLECTION_INFO),), errors=STORE_ERRORS)
DELETE_COLLECTION = Operation(
    summary="Delete a collection and its documents", tag="collections", params=NAME,
    replies=(Reply("Deleted.", obj({"name": STRING, "deleted": {"const": True}})),), errors=STORE_ERRORS)
ADD_DOCUMENTS = Operation(
    summary="Add documents, or replace them by id", tag="collections", params=NAME,
    description="Each document is split into passages, each passage embedded; a document's id replaces the "
                "document of that id.",
    body=Body((Field("documents", Passed({"type": "array", "minItems": 1, "items": {"oneOf": [
        {"type": "string"},
        {"type": "object", "required": ["text"], "additionalProperties": False, "properties": {
            "id": {"type": ["string", "integer"], "description": "Default: a new random id."},
            "text": {"type": "string"}, "url": {"type": "string"},
            "metadata": {"type": "object", "description": "Kept, returned and matched by search filters."}}},
    ]}}), "The documents: strings, or objects with 'text' and optionally 'id', 'url', 'metadata'.",
        required=True),),
        example={"documents": [{"id": "doc-1", "text": "Shared memory lets processes exchange data.",
                                "metadata": {"topic": "ipc"}},
                               "Sockets copy bytes through the kernel."]}),
    replies=(Reply("The ids written and the passages embedded.", obj({"ids": array(STRING), "passages": INTEGER})),),
    errors=(404, 429, 503))
GET_DOCUMENT = Operation(summary="One document", tag="collections", params={**NAME, **DOC_ID},
                         replies=(Reply("The document.", DOCUMENT),), errors=STORE_ERRORS)
DELETE_DOCUMENT = Operation(
    summary="Delete one document", tag="collections", params={**NAME, **DOC_ID},
    replies=(Reply("Deleted.", obj({"id": STRING, "deleted": {"const": True}})),), errors=STORE_ERRORS)
SEARCH_RESULT = obj({"id": STRING, "score": NUMBER, "passage": STRING, "url": {"type": ["string", "null"]},
                     "metadata": {"type": "object"}, "rerank_score": NUMBER},
                    required=["id", "score", "passage"], additionalProperties=True)
SEARCH = Operation(
    summary="Search a collection", tag="collections", params=NAME,
    body=Body((Field("query", String(input_limit=True), "The text to search for.", required=True),
               Field("top_k", Integer(), "How many documents (each with its best passage).", default=10),
               Field("filter", Passed({"type": "object"}), "Metadata every result must match: "
                     "{key: value} or {key: [values]}."),
               RERANK_CANDIDATES),
              example={"query": "how do processes share data?", "top_k": 3}),
    replies=(Reply("The best documents first.", obj({"results": array(SEARCH_RESULT)})),),
    errors=(404, 429, 503))


class _Resource:
    """A resource over the shared Retrieval."""

    def __init__(self, retrieval: Retrieval):
        self.retrieval = retrieval


class Collections(_Resource):
    """GET /collections."""

    @LIST_COLLECTIONS
    def on_get(self, req, resp):
        resp.media = {"collections": self.retrieval.store.list()}


class Collection(_Resource):
    """PUT, GET and DELETE /collections/{name}."""

    @CREATE_COLLECTION
    def on_put(self, req, resp, name):
        body = CREATE_COLLECTION.body
        doc = body.raw(self.retrieval.ctx, req)
        options = body.check(doc, self.retrieval.ctx.settings)["options"] if "options" in doc else (doc or None)
        info, created = self.retrieval.store.create(name, options)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = info

    @GET_COLLECTION
    def on_get(self, req, resp, name):
        resp.media = self.retrieval.store.info(name)

    @DELETE_COLLECTION
    def on_delete(self, req, resp, name):
        self.retrieval.store.delete(name)
        resp.media = {"name": name, "deleted": True}


class Documents(_Resource):
    """POST /collections/{name}/documents: add or replace documents by id."""

    @ADD_DOCUMENTS
    def on_post(self, req, resp, name):
        docs = ADD_DOCUMENTS.body.read(self.retrieval.ctx, req)["documents"]
        settings = self.retrieval.ctx.settings
        if isinstance(docs, list):
            if len(docs) > settings.max_inputs:
                raise too_large(f"{len(docs)} documents is over the limit of {settings.max_inputs} "
                                "(SHM_EMBED_MAX_INPUTS)")
            for i, d in enumerate(docs):  # before splitting: a document obeys the per-text limit too
                text = d if isinstance(d, str) else d.get("text") if isinstance(d, dict) else None
                if isinstance(text, str) and len(text) > settings.max_input_chars:
                    raise too_large(f"document {i} has {len(text)} characters, over the limit of "
                                    f"{settings.max_input_chars} (SHM_EMBED_MAX_INPUT_CHARS)")
        # The request's budget: its passages count as inputs, and their tokens as any request's.
        resp.media = self.retrieval.store.upsert(name, docs, max_passages=settings.max_inputs,
                                         max_tokens=settings.max_request_tokens)


class Document(_Resource):
    """GET and DELETE /collections/{name}/documents/{doc_id}."""

    @GET_DOCUMENT
    def on_get(self, req, resp, name, doc_id):
        resp.media = self.retrieval.store.get_document(name, doc_id)

    @DELETE_DOCUMENT
    def on_delete(self, req, resp, name, doc_id):
        self.retrieval.store.delete_document(name, doc_id)
        resp.media = {"id": doc_id, "deleted": True}


class Search(_Resource):
    """POST /collections/{name}/search: with 'rerank', the top_k candidates
    are reranked by a cross-encoder and cut to its top_n."""

    @SEARCH
    def on_post(self, req, resp, name):
        args = SEARCH.body.read(self.retrieval.ctx, req)
        results = self.retrieval.store.search(name, args["query"], args["top_k"], args["filter"])
        resp.media = {"results": rerank_results(self.retrieval.ctx, args["query"], results, args["rerank"])}


def add_routes(routes, ctx) -> Retrieval:
    """The collection routes, on ``routes`` (a web.openapi.RouteTable)."""
    retrieval = Retrieval(ctx)
    routes.add("/collections", Collections(retrieval))
    routes.add("/collections/{name}", Collection(retrieval))
    routes.add("/collections/{name}/documents", Documents(retrieval))
    routes.add("/collections/{name}/documents/{doc_id}", Document(retrieval))
    routes.add("/collections/{name}/search", Search(retrieval))
    return retrieval
