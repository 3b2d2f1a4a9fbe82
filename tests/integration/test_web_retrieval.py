"""Collections and web search through a real Gunicorn, real workers and a real
sidecar with the bundled model, against pages served by a local HTTP server.
The collection tests run against both stores: SQLite, and a second Gunicorn
on the same sidecar over a PostgreSQL database of the session's cluster."""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from retrieval.collections.store import CollectionStore
from retrieval.websearch.websearch import web_search_with_embeddings
from shm_protocol.config import Settings
from tests.helpers import client_for, start_sidecar, start_web, stop_and_check
from tests.postgres import STORES

NAV = ('<nav><a href="/">Home</a> <a href="/b">Bread recipes</a> <a href="/c">Chess club</a> '
       '<a href="/v">Volcano tours</a> <a href="/s">Solar deals</a> <a href="/w">Whale watching</a></nav>')
TOPICS = {
    "volcano": ("Volcanoes", "Magma forms deep in the mantle where rock melts. Being lighter than the solid rock "
                "around it, magma rises through cracks and collects in chambers below the volcano. When pressure "
                "from dissolved gases grows too high, the magma forces its way to the surface and erupts as lava, "
                "ash and volcanic gas."),
    "bread": ("Baking bread", "Mix flour, water, salt and yeast into a dough and knead it until smooth. Let the "
              "dough rise in a warm place for one to two hours until it doubles in size, shape the loaf, let it "
              "prove again, then bake it in a hot oven until the crust is brown."),
    "chess": ("Chess openings", "In the opening, players develop their knights and bishops, castle the king to "
              "safety and fight for the central squares. Moving the king's pawn two squares is a classic first "
              "move because it controls the centre and frees the queen and a bishop."),
    "solar": ("Solar power", "A photovoltaic cell is made of layers of silicon. When sunlight strikes it, photons "
              "knock electrons loose, and the electric field between the layers drives them into a current. "
              "An inverter turns this direct current into the alternating current homes use."),
    "whales": ("Whales", "Humpback whales travel thousands of kilometres every year between cold polar waters, "
               "where they feed on krill in summer, and warm tropical seas, where they breed and give birth to "
               "their calves in winter."),
}
QUERIES = {
    "How does magma reach the surface during an eruption?": "volcano",
    "How long should dough rise with yeast before it goes in the oven?": "bread",
    "What is a good first move to control the centre of the board?": "chess",
    "How do photovoltaic cells turn sunlight into electricity?": "solar",
    "Why do humpback whales migrate such long distances?": "whales",
}


def page(title: str, body: str) -> bytes:
    return (f"<html><head><title>{title}</title><script>var s = 'whale bread chess volcano solar';</script>"
            f"</head><body>{NAV}<main><h1>{title}</h1><p>{body}</p></main>"
            f"<footer>Copyright. Bread, chess, volcanoes, solar and whales.</footer></body></html>").encode()


class Pages(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the fetcher gave up on a slow page
            pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        base = f"http://127.0.0.1:{self.server.server_port}"
        if parts[0] == "pages" and parts[1] in TOPICS:
            self.send(200, page(*TOPICS[parts[1]]))
        elif parts[0] == "gzip":
            self.send(200, gzip.compress(page(*TOPICS["solar"])), headers={"Content-Encoding": "gzip"})
        elif parts[0] == "redirect":
            n = int(parts[1])
            target = "/pages/bread" if n <= 1 else f"/redirect/{n - 1}"
            self.send(302, b"", headers={"Location": target})
        elif parts[0] == "to-metadata":
            self.send(302, b"", headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif parts[0] == "image":
            self.send(200, b"\x89PNG\r\n\x1a\n" + b"\0" * 100, ctype="image/png")
        elif parts[0] == "huge":
            filler = "".join(f"<p>Paragraph {i} about nothing in particular, just filling space.</p>"
                             for i in range(3000))
            self.send(200, page("Huge", TOPICS["whales"][1])[:-14] + filler.encode() + b"</body></html>")
        elif parts[0] == "slow":
            time.sleep(3)
            self.send(200, page("Slow", "too late"))
        elif parts[0] == "empty":
            self.send(200, b"<html><body><nav><a href='/'>Home</a></nav><script>x()</script></body></html>")
        elif parts[0] == "search":
            results = [{"url": f"{base}/pages/{t}", "title": TOPICS[t][0], "content": "", "engine": "local"}
                       for t in TOPICS] + [{"url": f"{base}/missing", "title": "gone"}]
            self.send(200, json.dumps({"query": query, "results": results}).encode(), ctype="application/json")
        else:
            self.send(404, b"not found", ctype="text/plain")


@pytest.fixture(scope="module")
def pages():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


class Service:
    """A real sidecar and Gunicorn, restartable, over one collection store: the
    SQLite file of a data directory, or a PostgreSQL database (``url``). One
    made with another's sidecar (``shared``) starts and stops only its Gunicorn."""

    def __init__(self, tmp, pages: str, url: str | None = None, shared: Service | None = None):
        self.tmp = tmp
        self.data = tmp / "data"
        self.url = url
        self.location = url or str(self.data)
        self.pages = pages
        self.shared = shared
        self.sc = self.web = None

    def start(self):
        self.sc = self.shared.sc if self.shared is not None else start_sidecar(self.tmp, None)
        store = {"SHM_EMBED_COLLECTIONS_URL": self.url} if self.url else {}
        self.web = start_web(self.tmp, self.sc.env, workers=3, SHM_EMBED_DATA_DIR=self.data,
                             SHM_EMBED_FETCH_ALLOW="127.0.0.1", SHM_EMBED_SEARCH_URL=f"{self.pages}/search",
                             SHM_EMBED_FETCH_TIMEOUT_S="1", SHM_EMBED_FETCH_MAX_BYTES="65536",
                             SHM_EMBED_FETCH_MAX_REDIRECTS="5", SHM_EMBED_SEARCH_MAX_PAGES="12", **store)
        self.http = httpx.Client(base_url=self.web.base, timeout=60)

    def stop(self):
        self.http.close()
        assert self.web.stop() == 0
        if self.shared is None:
            stop_and_check(self.sc)


@pytest.fixture(scope="module")
def service(tmp_path_factory, pages):
    svc = Service(tmp_path_factory.mktemp("retrieval"), pages)
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module", params=STORES)
def collections(request, service, tmp_path_factory, pages):
    """The service of the collection tests: ``service`` itself (SQLite), or a
    Gunicorn of its own on the same sidecar over a PostgreSQL database."""
    if request.param == "sqlite":
        yield service
        return
    url = request.getfixturevalue("pg_cluster").create_database("web")
    svc = Service(tmp_path_factory.mktemp("retrieval-pg"), pages, url=url, shared=service)
    svc.start()
    yield svc
    svc.stop()


def post(http, path, doc):
    return http.post(path, json=doc)


def test_web_search_ranks_the_page_that_answers(service, pages):
    urls = [f"{pages}/pages/{t}" for t in TOPICS]
    for query, want in QUERIES.items():
        response = post(service.http, "/search/web", {"query": query, "urls": urls, "top_k": 3})
        assert response.status_code == 200, response.text
        doc = response.json()
        assert doc["failed"] == [] and len(doc["pages"]) == 5
        best = doc["results"][0]
        assert best["url"] == f"{pages}/pages/{want}", (query, doc["results"])
        assert best["title"] == TOPICS[want][0] and best["snippet"] and -1 <= best["score"] <= 1
        assert [r["score"] for r in doc["results"]] == sorted((r["score"] for r in doc["results"]), reverse=True)
        for res in doc["results"]:  # menus, scripts and footers are not text
            assert "Home" not in res["passage"] and "var s" not in res["passage"] and "Copyright" not in res["passage"]


def test_web_search_lists_every_failed_page_with_its_reason(service, pages):
    urls = {"missing": f"{pages}/missing", "image": f"{pages}/image", "slow": f"{pages}/slow",
            "metadata": f"{pages}/to-metadata", "loops": f"{pages}/redirect/9", "empty": f"{pages}/empty",
            "nohost": "http://no-such-host.invalid/", "scheme": "ftp://127.0.0.1/file",
            "private": "http://10.0.0.1/"}
    ok = [f"{pages}/redirect/3", f"{pages}/huge", f"{pages}/gzip"]
    r = post(service.http, "/search/web", {"query": "baking bread with yeast", "urls": list(urls.values()) + ok,
                                           "top_k": 2})
    assert r.status_code == 200, r.text
    doc = r.json()
    reasons = {f["url"]: f["reason"] for f in doc["failed"]}
    assert "HTTP 404" in reasons[urls["missing"]]
    assert "image/png" in reasons[urls["image"]]
    assert "timed out" in reasons[urls["slow"]]
    assert "169.254.169.254 is a link-local address" in reasons[urls["metadata"]]
    assert "more than 5 redirects" in reasons[urls["loops"]]
    assert "no text" in reasons[urls["empty"]]
    assert "resolve" in reasons[urls["nohost"]]
    assert "not an http" in reasons[urls["scheme"]]
    assert "private address" in reasons[urls["private"]]
    assert len(reasons) == len(urls)
    pages_by_url = {p["url"]: p for p in doc["pages"]}
    assert set(pages_by_url) == set(ok)
    assert pages_by_url[f"{pages}/redirect/3"]["final_url"] == f"{pages}/pages/bread"
    assert pages_by_url[f"{pages}/huge"]["truncated"] is True
    assert doc["results"][0]["url"] == f"{pages}/redirect/3"


def test_web_search_through_the_search_endpoint(service, pages):
    r = post(service.http, "/search/web", {"query": "Why do humpback whales migrate such long distances?"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["results"][0]["url"] == f"{pages}/pages/whales"
    assert [f["url"] for f in doc["failed"]] == [f"{pages}/missing"]


def test_web_search_refuses_private_addresses_by_default(service, pages):
    client = client_for(service.sc)
    try:
        out = web_search_with_embeddings("magma", [f"{pages}/pages/volcano", "http://localhost:1/"],
                                         client=client, settings=Settings.from_env({}))
        assert out.results == [] and out.pages == []
        assert all("refused" in f["reason"] for f in out.failed) and len(out.failed) == 2
        allowed = Settings.from_env({}, fetch_allow="127.0.0.1")
        out = web_search_with_embeddings("magma", [f"{pages}/pages/volcano", f"{pages}/pages/bread"],
                                         client=client, settings=allowed, max_concurrent=1, max_chars=300)
        assert out.results[0]["url"] == f"{pages}/pages/volcano" and out.failed == []
        assert all(p["passages"] == 1 for p in out.pages)  # max_chars cut each page to one passage
        text, urls = out  # the original's (text, urls)
        assert text.startswith(f"Source: {pages}/pages/volcano\nContent: ") and urls[0] == f"{pages}/pages/volcano"
    finally:
        client.close()


def test_web_search_bad_requests(service):
    http = service.http
    assert post(http, "/search/web", {"urls": []}).status_code == 422
    assert post(http, "/search/web", {"query": "x", "urls": "http://a/"}).status_code == 422
    assert post(http, "/search/web", {"query": "x", "urls": [], "top_k": 0}).status_code == 422
    r = http.post("/search/web", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_collections_are_shared_by_every_worker(collections):
    http = collections.http
    assert http.put("/collections/kb").status_code == 201
    assert http.put("/collections/kb").status_code == 200

    def write(k):
        docs = [{"id": f"t{k}-{i}", "text": f"{TOPICS[t][1]} (copy {k}-{i})", "url": f"u/{t}",
                 "metadata": {"topic": t, "writer": k}} for i, t in enumerate(TOPICS)]
        response = post(http, "/collections/kb/documents", {"documents": docs})
        assert response.status_code == 200, response.text
        return response.json()["ids"]

    with cf.ThreadPoolExecutor(6) as pool:
        ids = [i for out in pool.map(write, range(6)) for i in out]
    assert len(set(ids)) == 30
    for _ in range(6):  # whichever worker answers
        assert http.get("/collections/kb").json()["documents"] == 30
    response = post(http, "/collections/kb/search", {"query": "How do photovoltaic cells make electricity?", "top_k": 4,
                                                     "filter": {"writer": [1, 2]}})
    assert response.status_code == 200, response.text
    res = response.json()["results"]
    assert [x["metadata"]["topic"] for x in res[:2]] == ["solar", "solar"]
    assert {x["metadata"]["writer"] for x in res} <= {1, 2} and len({x["id"] for x in res}) == 4
    assert set(res[0]) == {"id", "score", "passage", "url", "metadata"}

    # a write by one worker is visible to searches in all of them within a second
    response = post(http, "/collections/kb/documents",
                    {"documents": [{"id": "new", "text": "Giraffes have long necks."}]})
    assert response.status_code == 200
    t0 = time.monotonic()
    seen = 0
    while seen < 6:
        hits = post(http, "/collections/kb/search", {"query": "giraffe neck", "top_k": 1}).json()["results"]
        seen = seen + 1 if hits and hits[0]["id"] == "new" else 0
        assert time.monotonic() - t0 < 1.0 or seen, "a write was not visible within a second"
    assert http.delete("/collections/kb/documents/new").json() == {"id": "new", "deleted": True}
    hits = post(http, "/collections/kb/search", {"query": "giraffe neck", "top_k": 1}).json()["results"]
    assert hits[0]["id"] != "new"


def test_collection_errors(collections, tiny_sidecar):
    http = collections.http
    assert http.get("/collections/nope").status_code == 404
    assert post(http, "/collections/nope/search", {"query": "x"}).status_code == 404
    assert http.delete("/collections/nope").status_code == 404
    assert http.put("/collections/bad%20name").status_code == 422
    http.put("/collections/errs")
    assert http.delete("/collections/errs/documents/absent").status_code == 404
    for body in ({}, {"documents": []}, {"documents": [{"text": ""}]}, {"documents": [{"text": 1}]},
                 {"documents": "text"}):
        assert post(http, "/collections/errs/documents", body).status_code == 422, body
    for body in ({}, {"query": 1}, {"query": "x", "top_k": 0}, {"query": "x", "top_k": "3"},
                 {"query": "x", "filter": []}, {"query": "x", "filter": {"a": {"$gt": 1}}}):
        assert post(http, "/collections/errs/search", body).status_code == 422, body
    assert http.put("/collections/errs", json={"index": "hnsw"}).status_code == 422
    assert http.put("/collections/errs", json={"index": "flat"}).status_code == 409
    # a collection another model made is refused with a clear error
    tiny = client_for(tiny_sidecar)
    other = CollectionStore(collections.location, tiny)
    other.create("tiny-made")
    other.upsert("tiny-made", ["a document"])
    other.close()
    tiny.close()
    r = post(http, "/collections/tiny-made/search", {"query": "x"})
    assert r.status_code == 409 and "dimensions" in r.json()["error"]["message"]
    assert http.get("/collections/tiny-made").json()["documents"] == 1


def test_a_restart_of_everything_keeps_the_collections(collections, request):
    before = collections.http.get("/collections/kb").json()
    collections.stop()
    if collections.url:  # the database server too
        cluster = request.getfixturevalue("pg_cluster")
        cluster.stop()
        cluster.start()
    collections.start()
    after = collections.http.get("/collections/kb").json()
    assert after["documents"] == before["documents"] == 30 and after["passages"] == before["passages"]
    r = post(collections.http, "/collections/kb/search", {"query": "knights and bishops", "top_k": 1})
    assert r.json()["results"][0]["metadata"]["topic"] == "chess"
