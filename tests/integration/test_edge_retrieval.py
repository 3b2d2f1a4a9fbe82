"""Hostile pages, filters, names and storage against the collections and web
search of a real Gunicorn over a real (synthetic) sidecar.

Each test injects its fault for real: a server that trickles its headers, pages
whose charset is no text encoding, a filter of a thousand values, a name with
a final newline, a corrupt database file, a full disk (a small tmpfs in a
mount namespace of the web service's own), a loose umask, and addresses that
resolve or tunnel to the internal network.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import select
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest

from retrieval.collections.store import DB_FILE, SCHEMA
from shm_protocol.config import Settings
from tests.helpers import (
    REPO,
    WebProc,
    free_port,
    start_sidecar,
    start_web,
    stop_and_check,
)

#: The per-fetch deadline the service runs with, and the pace of the trickling server (well inside
#: SHM_EMBED_FETCH_TIMEOUT_S, so no single read ever times out).
DEADLINE_S = 2.0
TRICKLE_S = 0.2
TOTAL_S = 8.0
TEXT = "Whales migrate between polar feeding grounds and tropical seas; a café serves the crew."


class Trickle:
    """A server that sends a status line, then one byte of a header every
    TRICKLE_S for as long as the client keeps the connection open. It records,
    by request path, when each connection was accepted and when the client
    closed it (recv gave b'' or the socket was reset)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: dict[str, dict] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, time.monotonic()), daemon=True).start()

    def _serve(self, conn: socket.socket, accepted: float):
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
            except OSError:
                return
            rec = self.conns[request.split(b" ", 2)[1].decode()] = {"accepted": accepted, "closed": None}
            conn.settimeout(None)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nX-Trickle: ")
                while not self.stop.is_set():
                    conn.sendall(b"a")
                    readable, _, _ = select.select([conn], [], [], TRICKLE_S)
                    if readable and not conn.recv(1):
                        break  # the client closed the connection
            except OSError:
                pass  # reset by the client
            rec["closed"] = time.monotonic()

    def held_for(self, path: str, wait_s: float) -> float | None:
        """Seconds from accept to the client's close of the connection that asked
        for ``path``, waiting up to ``wait_s`` past its accept; None if still open."""
        end = time.monotonic() + 10
        while time.monotonic() < end:
            rec = self.conns.get(path)
            if rec is not None:
                if rec["closed"] is not None:
                    return rec["closed"] - rec["accepted"]
                if time.monotonic() > rec["accepted"] + wait_s:
                    return None
            time.sleep(0.05)
        return None

    def close(self):
        self.stop.set()
        self.sock.close()


class Pages(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if parts[0] == "charset":  # /charset/<label>/<html|plain>: UTF-8 bytes, labelled as <label>
            kind = parts[2]
            body = (f"<html><head><title>Whales</title></head><body><p>{TEXT}</p></body></html>"
                    if kind == "html" else TEXT).encode()
            ctype = f"text/{kind}; charset={parts[1]}"
        elif parts[0] == "whales":
            body, ctype = f"<html><body><p>{TEXT}</p></body></html>".encode(), "text/html; charset=utf-8"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def servers():
    pages = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    pages.daemon_threads = True
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    trickle = Trickle()
    yield SimpleNamespace(pages=f"http://127.0.0.1:{pages.server_port}", trickle=trickle)
    trickle.close()
    pages.shutdown()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    sc = start_sidecar(tmp_path_factory.mktemp("edge-sc"), None, SHM_EMBED_SYNTHETIC_US="0")
    yield sc
    stop_and_check(sc)


def _web_env(sc) -> dict:
    return dict(sc.env, SHM_EMBED_FETCH_ALLOW="127.0.0.1", SHM_EMBED_FETCH_TIMEOUT_S="1",
                SHM_EMBED_FETCH_DEADLINE_S=str(DEADLINE_S), SHM_EMBED_FETCH_TOTAL_S=str(TOTAL_S),
                SHM_EMBED_SEARCH_MAX_PAGES="16")


@pytest.fixture(scope="module")
def service(tmp_path_factory, sidecar):
    """One worker (so that every search lands on the same fetcher), started under umask 0022."""
    tmp = tmp_path_factory.mktemp("edge-web")
    old = os.umask(0o022)
    try:
        web = start_web(tmp, _web_env(sidecar), workers=1, SHM_EMBED_DATA_DIR=tmp / "data")
    finally:
        os.umask(old)
    http = httpx.Client(base_url=web.base, timeout=60)
    yield SimpleNamespace(web=web, http=http, data=tmp / "data")
    http.close()
    assert web.stop() == 0


def _failed(doc: dict) -> dict:
    return {f["url"]: f["reason"] for f in doc["failed"]}


def test_web_search_lists_equal_scores_in_page_order(servers):
    """Six pages of the same text score exactly the same (the scores of equal
    passages must not depend on where their rows fall in a matrix product) and
    come back in the order the pages were given, a top_k cut keeping the first."""
    from retrieval.websearch.websearch import web_search_with_embeddings
    from tests.helpers import FixedVectorClient

    urls = [f"{servers.pages}/whales/{i}" for i in (5, 2, 6, 1, 4, 3)]
    settings = Settings.from_env({}, fetch_allow="127.0.0.1")
    out = web_search_with_embeddings("tropical seas", urls, top_k=4, client=FixedVectorClient(), settings=settings)
    assert out.failed == [] and len(out.pages) == 6
    assert [r["url"] for r in out.results] == urls[:4]
    assert len({r["score"] for r in out.results}) == 1


# --- 5: pages that trickle, pages with unusable charsets --------------------------------------------

def test_a_page_that_trickles_its_headers_is_cut_off_and_closed_at_the_deadline(service, servers):
    slow, good = f"{servers.trickle.base}/one", f"{servers.pages}/whales"
    t0 = time.monotonic()
    r = service.http.post("/search/web", json={"query": "whale migration", "urls": [slow, good]})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert took < DEADLINE_S + 1.5, f"the search took {took:.1f} s with a {DEADLINE_S} s fetch deadline"
    doc = r.json()
    assert [p["url"] for p in doc["pages"]] == [good]
    reason = _failed(doc)[slow]
    assert "timed out" in reason and "SHM_EMBED_FETCH_DEADLINE_S" in reason, reason
    held = servers.trickle.held_for("/one", DEADLINE_S + 2)
    assert held is not None and held <= DEADLINE_S + 2, f"the fetcher kept the connection open ({held})"


def test_seven_trickling_searches_leave_web_search_working(service, servers):
    """Seven searches of five trickling pages each (35 connections, more than the
    fetcher's pool of 32) used to leave web search on that worker broken."""
    paths = [[f"/many-{i}-{j}" for j in range(5)] for i in range(7)]

    def search(i):
        return service.http.post("/search/web", json={"query": "whales", "urls": [
            servers.trickle.base + p for p in paths[i]]})

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(7) as pool:
        answers = list(pool.map(search, range(7)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert all(len(a.json()["failed"]) == 5 for a in answers)
    # one worker of 4 threads: two rounds of searches, each over at the deadline
    assert time.monotonic() - t0 < 2 * DEADLINE_S + 3
    for p in (p for group in paths for p in group):
        held = servers.trickle.held_for(p, DEADLINE_S + 2)
        assert held is not None and held <= DEADLINE_S + 2, f"{p}: connection still open ({held})"
    r = service.http.post("/search/web", json={"query": "whales", "urls": [f"{servers.pages}/whales"]})
    assert r.status_code == 200 and r.json()["failed"] == [], r.text
    assert TEXT in r.json()["results"][0]["passage"]


def test_a_page_whose_charset_is_no_text_encoding_is_read_as_utf8(service, servers):
    labels = ["rot13", "idna", "base64", "hex", "zlib", "x-no-such-charset", "utf-8-sig"]
    urls = [f"{servers.pages}/charset/{label}/{kind}" for label in labels for kind in ("html", "plain")]
    r = service.http.post("/search/web", json={"query": "whales", "urls": urls, "top_k": 20})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["failed"] == [] and sorted(p["url"] for p in doc["pages"]) == sorted(urls)
    assert len(doc["results"]) == len(urls)
    assert all(res["passage"] == TEXT for res in doc["results"]), doc["results"]  # UTF-8, not rot13'd


# --- 6, 7: filters and names ------------------------------------------------------------------------

def test_a_filter_is_capped_with_a_422_and_works_at_the_cap(service):
    http = service.http
    assert http.put("/collections/filters").status_code == 201
    docs = [{"id": f"d{i}", "text": f"document number {i}", "metadata": {"n": i, "tag": f"t{i % 3}"}}
            for i in range(20)]
    assert http.post("/collections/filters/documents", json={"documents": docs}).status_code == 200

    def ids(flt):
        response = http.post("/collections/filters/search", json={"query": "document", "top_k": 50, "filter": flt})
        assert response.status_code == 200, response.text
        return sorted(int(x["id"][1:]) for x in response.json()["results"])

    assert ids({"n": list(range(5, 1005))}) == list(range(5, 20))  # 1,000 values of one key
    many_keys = {f"k{i}": None for i in range(999)}  # 999 keys nobody has (null matches), and one more
    assert ids({**many_keys, "n": 3}) == [3]
    assert ids({"tag": ["t1", "t2"], "n": [1, 2, 3, 4, None]}) == [1, 2, 4]
    response = http.post("/collections/filters/search", json={"query": "document", "filter": {"n": list(range(1001))}})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "1000" in message and "SHM_EMBED_FILTER_MAX_VALUES" in message
    response = http.post("/collections/filters/search", json={"query": "document", "filter": {"n\n": 1}})
    assert response.status_code == 422, response.text


def test_a_collection_name_with_a_final_newline_is_refused(service):
    http = service.http
    r = http.put("/collections/named%0A")
    assert r.status_code == 422, r.text
    assert "[A-Za-z0-9][A-Za-z0-9_.-]{0,127}" in r.json()["error"]["message"]
    assert http.put("/collections/named").status_code == 201
    assert http.get("/collections/named%0A").status_code == 422
    assert http.post("/collections/named%0A/documents", json={"documents": ["x"]}).status_code == 422
    assert [c["name"] for c in http.get("/collections").json()["collections"]].count("named") == 1


# --- 10: private files under a loose umask ----------------------------------------------------------

def test_the_store_is_private_under_a_loose_umask(service):
    assert service.http.put("/collections/private").status_code in (200, 201)
    r = service.http.post("/collections/private/documents", json={"documents": ["a secret"]})
    assert r.status_code == 200, r.text
    assert stat.S_IMODE(service.data.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in service.data.iterdir()}
    assert {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"} <= set(files), files  # WAL and SHM while it runs
    assert set(files.values()) == {0o600}, {k: oct(v) for k, v in files.items()}


# --- 9 (part), 11: refusals name no resolved address; tunnels are refused ------------------------------

def test_refusals_do_not_quote_resolved_addresses_and_tunnels_are_refused(service, servers):
    port = servers.pages.rsplit(":", 1)[1]
    named = f"http://0177.0.0.2:{port}/whales"  # a name to the resolver (octal): it answers 127.0.0.2
    tunnels = {f"http://[2002:7f00:1::1]:{port}/": "6to4",  # 6to4 of 127.0.0.1
               "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/": "Teredo",
               f"http://[64:ff9b::a00:1]:{port}/": "private",  # NAT64 of 10.0.0.1
               f"http://[::7f00:1]:{port}/": "IPv4-compatible"}
    r = service.http.post("/search/web", json={"query": "whales", "urls": [named, *tunnels]})
    assert r.status_code == 200, r.text
    reasons = _failed(r.json())
    assert reasons[named].startswith("refused") and "127.0.0.2" not in reasons[named], reasons[named]
    for url, what in tunnels.items():
        assert reasons[url].startswith("refused") and what in reasons[url], (url, reasons[url])
    assert "0177.0.0.2 resolves to 127.0.0.2" in service.web.log.read_text(errors="replace")


# --- 8: storage failures --------------------------------------------------------------------------

def _malformed_db(path) -> None:
    """A store database whose first page (header and schema) is sound and every other page is garbage."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO collections (name, model, dim, options, created) VALUES ('kb', 'm', 8, '{}', 0)")
    db.commit()
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(page)
        f.write(b"\xff" * (size - page))


def _assert_storage_503(r: httpx.Response, reason: str, data) -> None:
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After", "").isdigit(), r.headers
    message = r.json()["error"]["message"]
    assert message == f"collection store unavailable: {reason}", message
    assert str(data) not in r.text and "sqlite" not in r.text.lower()


def test_a_corrupt_database_is_a_503_with_a_short_reason(tmp_path, sidecar):
    from web.collections_api import Retrieval

    data = tmp_path / "data"
    status = Retrieval(SimpleNamespace(settings=Settings.from_env({}, data_dir=str(data)))).store_status
    assert status() == (True, "ok") and not data.exists()  # nothing to check yet, and nothing made
    data.mkdir()
    (data / DB_FILE).write_bytes(b"this is no database, just some bytes " * 200)
    assert status() == (False, "collection store unavailable: the database is corrupt")
    web = start_web(tmp_path, _web_env(sidecar), workers=1, SHM_EMBED_DATA_DIR=data)
    try:
        with httpx.Client(base_url=web.base, timeout=30) as http:
            for response in (http.get("/collections"), http.put("/collections/kb"),
                             http.post("/collections/kb/search", json={"query": "x"})):
                _assert_storage_503(response, "the database is corrupt", data)
            _malformed_db(data / DB_FILE.replace(".sqlite3", "-new.sqlite3"))
            os.replace(data / DB_FILE.replace(".sqlite3", "-new.sqlite3"), data / DB_FILE)
            for response in (http.get("/collections"), http.get("/collections/kb")):
                _assert_storage_503(response, "the database is corrupt", data)
            assert status() == (False, "collection store unavailable: the database is corrupt")
            assert http.get("/health").status_code == 200
    finally:
        assert web.stop() == 0
    log = web.log.read_text(errors="replace")
    assert "file is not a database" in log and "database disk image is malformed" in log  # details: the log


def _start_web_on_tmpfs(tmp_path, env: dict, data, size: str) -> WebProc:
    """Gunicorn in a mount namespace of its own, where ``data`` is a tmpfs of ``size``."""
    port = free_port()
    env = dict(env, SHM_EMBED_DATA_DIR=str(data), SHM_EMBED_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="2")
    log = tmp_path / f"web-{port}.log"
    cmd = (f"mount -t tmpfs -o size={size} tmpfs {data} && "
           f"exec {sys.executable} -m gunicorn -c {REPO / 'gunicorn.conf.py'}")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], env=env, cwd=REPO, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    web = WebProc(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(web.base + "/health", timeout=2).status_code == 200:
                return web
        except httpx.HTTPError:
            time.sleep(0.1)
    web.stop()
    raise RuntimeError(f"gunicorn did not answer:\n{log.read_text(errors='replace')}")


def test_a_full_disk_is_a_503_and_leaves_the_store_readable(tmp_path, sidecar):
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to give the web service a small private filesystem")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here (needs root or user namespaces): {probe.stderr.strip()}")
    data = tmp_path / "data"
    data.mkdir()
    web = _start_web_on_tmpfs(tmp_path, _web_env(sidecar), data, "512k")
    try:
        with httpx.Client(base_url=web.base, timeout=60) as http:
            assert http.put("/collections/kb").status_code == 201
            first = [{"id": "first", "text": "the first document fits"}]
            assert http.post("/collections/kb/documents", json={"documents": first}).status_code == 200
            filler = " ".join(f"word{i}" for i in range(60))
            docs = [{"id": f"d{i}", "text": f"{filler} {i}"} for i in range(600)]  # about 2 MB with the vectors
            response = http.post("/collections/kb/documents", json={"documents": docs})
            _assert_storage_503(response, "the disk is full", data)
            # the failed write let go of its transaction: the next one fails as fast, it does not queue
            t0 = time.monotonic()
            response = http.post("/collections/kb/documents", json={"documents": docs})
            _assert_storage_503(response, "the disk is full", data)
            assert time.monotonic() - t0 < 10
            assert http.get("/collections/kb").json()["documents"] == 1  # readable, nothing half-written
            response = http.post("/collections/kb/search", json={"query": "first document"})
            assert response.status_code == 200 and response.json()["results"][0]["id"] == "first", response.text
    finally:
        assert web.stop() == 0
    assert "database or disk is full" in web.log.read_text(errors="replace")
