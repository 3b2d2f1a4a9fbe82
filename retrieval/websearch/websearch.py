"""Web search ranked by embeddings: fetch pages, extract their main text,
split it into passages, embed the query and every passage in one batch, and
return the best passages.

Pages are fetched concurrently by a pool private to each call (the original's
nested global semaphore deadlocked two concurrent searches); the whole search
has one deadline (``SHM_EMBED_FETCH_TOTAL_S``). Every page that yields nothing
is reported in ``failed`` with the reason.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from urllib.parse import urlencode, urlsplit

import httpcore
import numpy as np
from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.errors import InvalidInput

from ..errors import FetchFailed, FetchRefused, SearchBackendFailed
from ..faiss_index import PassageIndex
from ..passages import splitter_for
from .extract import extract
from .fetch import USER_AGENT, DeadlineBackend, Fetcher, fetch_deadline

#: Words per passage of a fetched page, and the overlap of neighbours.
PAGE_PASSAGE_WORDS, PAGE_OVERLAP_WORDS = 120, 20
#: Characters of a page's text that are embedded (about 25 passages).
MAX_PAGE_CHARS = 20_000
SNIPPET_CHARS = 240
MAX_TOP_K = 50


@dataclass
class WebSearchResult:
    query: str
    results: list[dict] = field(default_factory=list)   # url, title, score, snippet, passage; best first
    pages: list[dict] = field(default_factory=list)     # url, final_url, title, passages, truncated
    failed: list[dict] = field(default_factory=list)    # url, reason

    def to_dict(self) -> dict:
        return asdict(self)

    def as_text(self) -> str:
        """The original's text block: source, content and score of each result."""
        return "\n\n".join(f"Source: {r['url']}\nContent: {r['passage']}\nRelevance: {r['score']:.3f}"
                             for r in self.results)

    def __iter__(self):
        """Unpacks as the original's ``(text, urls)``."""
        return iter((self.as_text(), list(dict.fromkeys(r["url"] for r in self.results))))


def search_backend(settings: Settings, query: str) -> list[str]:
    """Result URLs of the configured SearxNG-compatible endpoint, best first."""
    sep = "&" if urlsplit(settings.search_url).query else "?"
    url = f"{settings.search_url}{sep}{urlencode({'q': query, 'format': 'json'})}"
    timeout = settings.fetch_timeout_s
    timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    try:
        # The endpoint's answer has the same deadline as a page: a trickling one cannot hold the request.
        with fetch_deadline(time.monotonic() + settings.fetch_deadline_s), \
                httpcore.ConnectionPool(network_backend=DeadlineBackend(), retries=0) as pool:
            resp = pool.request("GET", url, headers=[(b"User-Agent", USER_AGENT.encode()),
                                                     (b"Accept", b"application/json")],
                                extensions={"timeout": timeouts})
    except Exception as exc:  # any transport failure of the operator's endpoint
        raise SearchBackendFailed(f"search endpoint failed: {exc or type(exc).__name__}") from None
    if resp.status != 200:
        raise SearchBackendFailed(f"search endpoint answered HTTP {resp.status}")
    try:
        doc = json.loads(resp.content)
        urls = [r["url"] for r in doc["results"] if isinstance(r, dict) and isinstance(r.get("url"), str)]
    except (ValueError, KeyError, TypeError) as exc:
        raise SearchBackendFailed(f"search endpoint answered no SearxNG JSON results: {exc}") from None
    return urls


def _snippet(text: str) -> str:
    if len(text) <= SNIPPET_CHARS:
        return text
    cut = text.rfind(" ", 0, SNIPPET_CHARS)
    return text[: cut if cut > 0 else SNIPPET_CHARS] + "…"


def web_search_with_embeddings(query: str, urls: list[str] | None = None, *, client, top_k: int = 5,
                               settings: Settings | None = None, fetcher: Fetcher | None = None,
                               max_concurrent: int | None = None,
                               max_chars: int = MAX_PAGE_CHARS) -> WebSearchResult:
    """Rank the passages of ``urls`` (or of the configured search endpoint's
    results for ``query``) by cosine similarity to ``query``, embedding with
    ``client`` (an EmbeddingClient, or anything with ``embed`` and ``info``).
    ``max_concurrent`` and ``max_chars`` (characters of a page embedded) keep
    the original's keywords; the result unpacks as its ``(text, urls)``."""
    settings = settings or Settings.from_env()
    if max_concurrent is not None:
        settings = settings.replace(fetch_concurrency=max_concurrent)
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("'query' must be a non-empty string")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"'top_k' must be an integer from 1 to {MAX_TOP_K}")
    if urls is None:
        if not settings.search_url:
            raise InvalidInput("give 'urls', or configure a search endpoint (SHM_EMBED_SEARCH_URL)")
        urls = search_backend(settings, query)
    elif not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise InvalidInput("'urls' must be a list of strings")
    out = WebSearchResult(query)
    urls = list(dict.fromkeys(urls))
    for url in urls[settings.search_max_pages:]:
        out.failed.append({"url": url, "reason": f"over the limit of {settings.search_max_pages} pages "
                                               "(SHM_EMBED_SEARCH_MAX_PAGES)"})
    urls = urls[: settings.search_max_pages]
    if not urls:
        return out

    own = fetcher is None
    fetcher = fetcher or Fetcher(settings)
    deadline = time.monotonic() + settings.fetch_total_s
    pool = ThreadPoolExecutor(max_workers=min(settings.fetch_concurrency, len(urls)),
                              thread_name_prefix="shm-embed-fetch")
    try:
        futures = {pool.submit(fetcher.fetch, url, deadline): url for url in urls}
        wait(futures, timeout=settings.fetch_total_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # fetches still running are abandoned
        if own:
            fetcher.close()
    split = splitter_for(client, words=PAGE_PASSAGE_WORDS, overlap=PAGE_OVERLAP_WORDS)
    passages: list[tuple[int, str]] = []   # (page number, passage)
    for fut, url in futures.items():
        if not fut.done():
            out.failed.append({"url": url, "reason": f"not fetched within {settings.fetch_total_s:g} s"})
            continue
        try:
            page = fut.result()
        except (FetchRefused, FetchFailed) as exc:
            out.failed.append({"url": url, "reason": str(exc)})
            continue
        except Exception:  # a fetch must never sink the whole search
            logger.exception("fetching {} failed", url)
            out.failed.append({"url": url, "reason": "the page could not be read (see the server log)"})
            continue
        try:
            title, text = extract(page.body, page.content_type, page.charset)
        except Exception:  # nor a page that the extraction chokes on
            logger.exception("extracting the text of {} failed", url)
            out.failed.append({"url": url, "reason": "the page could not be read (see the server log)"})
            continue
        text = text[:max_chars]
        spans = split(text)
        if not spans:
            out.failed.append({"url": url, "reason": "no text found on the page"})
            continue
        passages.extend((len(out.pages), text[a:b]) for a, b in spans)
        out.pages.append({"url": url, "final_url": page.final_url, "title": title or url, "passages": len(spans),
                          "truncated": page.truncated})
    if not passages:
        return out
    vecs = client.embed([query] + [p for _, p in passages], normalize=True)
    # Scored as a collection is (a matrix product may score equal passages differently by where their
    # rows fall), equal scores in passage order: the pages' order as given, then each page's own.
    index = PassageIndex(vecs.shape[1])
    index.add(np.arange(len(passages)), vecs[1:])
    scores, order = index.search(vecs[0], top_k)
    for score, i in zip(scores.tolist(), order.tolist()):
        page_no, text = passages[i]
        page = out.pages[page_no]
        out.results.append({"url": page["url"], "title": page["title"], "score": float(score),
                            "snippet": _snippet(text), "passage": text})
    return out
