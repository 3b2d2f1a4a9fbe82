"""Rerank resources: POST /rerank (text-embeddings-inference's shape) and
POST /v1/rerank (Cohere's and Jina's): a cross-encoder scores each
(query, document) pair, and the answer lists them best first."""

from __future__ import annotations

import uuid

import numpy as np

from .embeddings import PROMPT_FIELDS
from .errors import too_large
from .schema import (
    INTEGER,
    NUMBER,
    STRING,
    Body,
    Boolean,
    Field,
    FlagOrObject,
    Integer,
    Operation,
    Reply,
    String,
    Texts,
    array,
    obj,
)

QUERY = Field("query", String(min_length=1, input_limit=True), "The query the documents are scored against.",
              required=True)
RERANK_MODEL = Field("model", String(), "A served reranker's name (GET /v1/models); default: the sidecar's first "
                     "reranker.")
TRUNCATE = Field("truncate", Boolean(), "Cut pairs longer than the model's limit; false: such a pair is a 413.",
                 default=True)
RERANK_ERRORS = (404, 429, 503)
EXAMPLE_DOCUMENTS = ["Processes share data in shared memory.", "The weather is mild today."]

TEI_RERANK = Operation(
    summary="Rerank texts against a query (text-embeddings-inference's shape)",
    tag="rerank",
    body=Body(
        (QUERY,
         Field("texts", Texts(list_only=True), "The texts to score.", required=True),
         Field("raw_scores", Boolean(), "The model's logits instead of their sigmoid.", default=False),
         Field("return_text", Boolean(), "Give each result its text.", default=False),
         TRUNCATE, RERANK_MODEL, *PROMPT_FIELDS),
        example={"query": "how do processes share data?", "texts": EXAMPLE_DOCUMENTS},
    ),
    replies=(Reply("One result per text, best first.",
                   array(obj({"index": INTEGER, "score": NUMBER, "text": STRING}, required=["index", "score"]))),),
    errors=RERANK_ERRORS,
)

COHERE_RERANK = Operation(
    summary="Rerank documents against a query (Cohere's and Jina's shape)",
    tag="rerank",
    body=Body(
        (QUERY,
         Field("documents", Texts(list_only=True, objects=True), "The documents to score: strings, or objects "
               "with a 'text'.", required=True),
         Field("top_n", Integer(minimum=1), "Give only the best this many; default: all."),
         Field("return_documents", Boolean(), "Give each result its document.", default=False),
         TRUNCATE, RERANK_MODEL, *PROMPT_FIELDS),
        example={"query": "how do processes share data?", "documents": EXAMPLE_DOCUMENTS, "top_n": 1},
    ),
    replies=(Reply("The results, best first, and the tokens they took.", obj({
        "id": STRING, "model": STRING,
        "results": array(obj({"index": INTEGER, "relevance_score": NUMBER, "document": obj({"text": STRING})},
                             required=["index", "relevance_score"])),
        "usage": obj({"total_tokens": INTEGER}),
        "meta": obj({"billed_units": obj({"search_units": INTEGER})}),
    })),),
    errors=RERANK_ERRORS,
)


def rerank_options(args: dict) -> dict:
    """The client's options of a checked rerank body."""
    return {key: args[key] for key in ("model", "truncate", "prompt", "prompt_name")}


class Rerank:
    """POST /rerank -> [{"index", "score", "text"?}], best first."""

    def __init__(self, ctx):
        self.ctx = ctx

    @TEI_RERANK
    def on_post(self, req, resp):
        args = TEI_RERANK.body.read(self.ctx, req)
        texts = args["texts"]
        res = self.ctx.rerank(args["query"], texts, raw_scores=args["raw_scores"], **rerank_options(args))
        with_text = args["return_text"]
        order = np.argsort(-res.scores, kind="stable")
        resp.media = [{"index": int(i), "score": float(res.scores[i]), **({"text": texts[i]} if with_text else {})}
                      for i in order]


class CohereRerank:
    """POST /v1/rerank -> {"results": [{"index", "relevance_score", "document"?}], best first}."""

    def __init__(self, ctx):
        self.ctx = ctx

    @COHERE_RERANK
    def on_post(self, req, resp):
        args = COHERE_RERANK.body.read(self.ctx, req)
        texts = args["documents"]
        res = self.ctx.rerank(args["query"], texts, **rerank_options(args))
        order = np.argsort(-res.scores, kind="stable")[: args["top_n"] or len(texts)]
        results = [{"index": int(i), "relevance_score": float(res.scores[i]),
                    **({"document": {"text": texts[i]}} if args["return_documents"] else {})} for i in order]
        resp.media = {"id": uuid.uuid4().hex, "model": res.model, "results": results,
                      "usage": {"total_tokens": res.total_tokens},
                      "meta": {"billed_units": {"search_units": 1}}}


#: A search's 'rerank' option (collections and web search alike).
RERANK_CANDIDATES = Field(
    "rerank", FlagOrObject((
        Field("model", String(), "A served reranker's name; default: the first reranker."),
        Field("top_n", Integer(minimum=1), "Keep the best this many; default: all the candidates."),
    )),
    "Rerank the top_k candidates with a cross-encoder: true, or an object with 'model' and 'top_n'. "
    "Each result keeps its 'score' and gains a 'rerank_score'.")


def rerank_results(ctx, query: str, results: list[dict], spec: dict | None) -> list[dict]:
    """Candidates (each with a 'passage') scored by a cross-encoder against
    ``query`` (``spec``: a checked RERANK_CANDIDATES, None: as they are),
    best first, cut to ``top_n``; each keeps its 'score' and gains a 'rerank_score'."""
    if spec is None or not results:
        return results
    limit = ctx.settings.max_inputs
    if len(results) > limit:  # pairs count as inputs, as on /rerank
        raise too_large(f"{len(results)} candidates to rerank is over the limit of {limit} (SHM_EMBED_MAX_INPUTS); "
                        "ask for fewer (top_k)")
    res = ctx.rerank(query, [r["passage"] for r in results], model=spec["model"])
    for result, score in zip(results, res.scores.tolist()):
        result["rerank_score"] = score
    results = sorted(results, key=lambda r: -r["rerank_score"])
    return results[: spec["top_n"] or len(results)]
