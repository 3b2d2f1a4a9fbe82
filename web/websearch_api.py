"""POST /search/web: the passages of fetched pages (given, or found by the
configured search endpoint) ranked against a query. lxml and the fetcher
are imported on first use, so a worker that serves only embeddings does not
carry them."""

from __future__ import annotations

import threading

from .rerank import RERANK_CANDIDATES, rerank_results
from .schema import INTEGER, NUMBER, STRING, Body, Field, Integer, Operation, Passed, Reply, String, array, obj

WEB_SEARCH = Operation(
    summary="Search the web: fetch pages and rank their passages against a query", tag="web search",
    description="Without 'urls', the pages are those the configured search endpoint (SHM_EMBED_SEARCH_URL) "
                "finds for the query. Pages are fetched with the limits of SHM_EMBED_FETCH_*; a page that "
                "cannot be fetched is listed in 'failed'.",
    body=Body((Field("query", String(input_limit=True), "The text to search for.", required=True),
               Field("urls", Passed({"type": "array", "items": {"type": "string"}}),
                     "The pages to rank; default: the search endpoint's results."),
               Field("top_k", Integer(), "How many passages.", default=5),
               RERANK_CANDIDATES),
              example={"query": "how do processes share data?", "top_k": 3}),
    replies=(Reply("The best passages first, the pages read and those that failed.", obj({
        "query": STRING,
        "results": array(obj({"url": STRING, "title": STRING, "score": NUMBER, "snippet": STRING, "passage": STRING,
                              "rerank_score": NUMBER}, required=["url", "score", "passage"])),
        "pages": array(obj({"url": STRING, "final_url": STRING, "title": STRING, "passages": INTEGER},
                           required=["url"], additionalProperties=True)),
        "failed": array(obj({"url": STRING, "reason": STRING})),
    })),),
    errors=(429, 502, 503))


class WebSearch:
    """POST /search/web: {"query", "urls"?, "top_k"?, "rerank"?} -> {"results", "pages", "failed"}."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._lock = threading.Lock()
        self._fetcher = None

    @property
    def fetcher(self):
        """This worker's page Fetcher."""
        with self._lock:
            if self._fetcher is None:
                from retrieval.websearch.fetch import Fetcher

                self._fetcher = Fetcher(self.ctx.settings)
            return self._fetcher

    @WEB_SEARCH
    def on_post(self, req, resp):
        args = WEB_SEARCH.body.read(self.ctx, req)
        from retrieval.websearch.websearch import web_search_with_embeddings

        result = web_search_with_embeddings(args["query"], args["urls"], top_k=args["top_k"], client=self.ctx.client,
                                            settings=self.ctx.settings, fetcher=self.fetcher)
        result.results = rerank_results(self.ctx, args["query"], result.results, args["rerank"])
        resp.media = result.to_dict()
