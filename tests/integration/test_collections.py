"""Collections and in-memory indexes with real FAISS, a real sidecar and
real writer processes. Every collection test runs against both stores: a
SQLite file of its own, and a database of its own on the session's
PostgreSQL cluster (``store_location``, tests/conftest.py)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from compat.index import build_vector_index, search_index
from retrieval.collections.database import is_postgres
from retrieval.collections.documents import CollectionOptions, parse_documents
from retrieval.collections.store import DB_FILE, CollectionStore
from retrieval.errors import CollectionConflict, CollectionNotFound
from shm_protocol.errors import InvalidInput
from tests.helpers import REPO, FixedVectorClient, client_for, cosine_rows, start_sidecar, stop_and_check

DOCS = ["The cat sat on the warm mat.", "Paris is the capital of France.",
        "Python is a programming language.", "Bananas are a yellow fruit."]


@pytest.fixture(scope="module")
def client(tiny_sidecar):
    c = client_for(tiny_sidecar)
    yield c
    c.close()


def _cos(st, query, docs):
    q = st.encode([query], normalize_embeddings=True)
    d = st.encode(docs, normalize_embeddings=True)
    return (d @ q.T)[:, 0]


def test_search_index_returns_every_document_once_with_cosine_scores(client, tiny_st):
    idx = build_vector_index(DOCS, [f"https://example.org/{i}" for i in range(4)], client=client)
    want = _cos(tiny_st, "capital city", DOCS)
    res = search_index("capital city", idx, top_k=10, client=client)
    assert sorted(r["id"] for r in res) == [0, 1, 2, 3]  # more asked than exist: each once
    assert [r["rank"] for r in res] == [1, 2, 3, 4]
    assert [r["id"] for r in res] == list(np.argsort(-want))
    for result in res:
        assert result["score"] == pytest.approx(float(want[result["id"]]), abs=1e-4)
        assert result["relevance_score"] == result["score"] and result["url"] == f"https://example.org/{result['id']}"
        assert result["full_content"] == DOCS[result["id"]] and result["length"] == len(DOCS[result["id"]])
    # the original's calling convention: a tuple out, (query, index, metadata, top_k) in
    index, embeddings, metadata = build_vector_index(DOCS, client=client)
    assert embeddings.shape[0] == 4 and len(metadata) == 4
    old = search_index("capital city", index, metadata, 2, client=client)
    assert [r["id"] for r in old] == [r["id"] for r in res[:2]]
    assert search_index("x", build_vector_index([], client=client), top_k=3, client=client) == []
    with pytest.raises(InvalidInput):
        build_vector_index("not a list", client=client)
    with pytest.raises(InvalidInput):
        build_vector_index(DOCS, urls=["only one"], client=client)


def query(location: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` (no parameters) read straight from a store's database, around the store."""
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location) as conn:
            return [tuple(r) for r in conn.execute(sql)]
    db = sqlite3.connect(Path(location) / DB_FILE)
    try:
        return [tuple(r) for r in db.execute(sql)]
    finally:
        db.close()


def test_collection_lifecycle_survives_a_restart(client, tiny_st, store_location):
    store = CollectionStore(store_location, client)
    info, created = store.create("kb", {"passage_words": 10, "overlap_words": 2})
    assert created and info["documents"] == 0 and info["dimension"] == tiny_st.get_embedding_dimension()
    assert store.create("kb")[1] is False
    long = " ".join(f"filler{i}" for i in range(30)) + " Paris is the capital of France."
    out = store.upsert("kb", [{"id": "a", "text": long, "url": "u:a", "metadata": {"lang": "en"}},
                              {"id": "b", "text": DOCS[3], "metadata": {"lang": "fr"}}])
    assert out["ids"] == ["a", "b"] and out["passages"] == 6  # 36 words: windows at 0, 8, 16, 24, 32
    res = store.search("kb", "Paris is the capital of France.", top_k=5)
    assert [r["id"] for r in res] == ["a", "b"]  # one entry per document, its best passage
    assert res[0]["passage"].endswith("capital of France.") and res[0]["score"] == pytest.approx(
        float(_cos(tiny_st, "Paris is the capital of France.", [res[0]["passage"]])[0]), abs=1e-4)
    assert [r["id"] for r in store.search("kb", "anything", filter={"lang": "fr"})] == ["b"]
    assert sorted(r["id"] for r in store.search("kb", "anything", filter={"lang": ["fr", "en"]})) == ["a", "b"]
    assert store.search("kb", "anything", filter={"lang": "de"}) == []
    store.upsert("kb", [{"id": "a", "text": "short now", "metadata": {"lang": "en"}}])  # replace by id
    assert store.info("kb")["passages"] == 2
    store.close()

    again = CollectionStore(store_location, client)  # a restart: a new process would do the same
    assert again.info("kb")["documents"] == 2
    assert again.get_document("kb", "a")["text"] == "short now"
    assert {r["passage"] for r in again.search("kb", "short", top_k=5)} == {"short now", DOCS[3]}
    again.delete_document("kb", "a")
    assert [r["id"] for r in again.search("kb", "short")] == ["b"]
    with pytest.raises(CollectionNotFound):
        again.delete_document("kb", "a")
    again.delete("kb")
    with pytest.raises(CollectionNotFound):
        again.search("kb", "x")
    with pytest.raises(InvalidInput):
        again.create("../etc")
    again.create("kb2", {"index": "flat"})
    with pytest.raises(CollectionConflict):
        again.create("kb2", {"index": "ivf"})
    again.close()


def test_a_collection_of_another_model_is_refused(client, store_location, tmp_path, tmp_path_factory):
    from sidecar.tiny import make_tiny_model

    store = CollectionStore(store_location, client)
    store.create("kb")
    store.upsert("kb", DOCS)
    other_model = make_tiny_model(tmp_path_factory.mktemp("other"), hidden=48)
    sc = start_sidecar(tmp_path, str(other_model), SHM_EMBED_TORCH_THREADS="1")
    try:
        other = client_for(sc)
        foreign = CollectionStore(store_location, other)
        with pytest.raises(CollectionConflict, match="48"):
            foreign.search("kb", "query")
        with pytest.raises(CollectionConflict):
            foreign.upsert("kb", ["more"])
        assert foreign.info("kb")["documents"] == 4  # readable, not writable
        foreign.close()
        other.close()
    finally:
        stop_and_check(sc)


def test_ivf_collection_trains_once_and_finds_exact_matches(client, store_location):
    store = CollectionStore(store_location, client, nprobe=8)
    store.create("big", {"index": "ivf"})
    texts = [f"record {i} of the catalogue: item {i * 7 % 1000} in aisle {i % 37}" for i in range(1100)]
    store.upsert("big", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    if store.snapshots is not None:  # the SQLite store's: a PostgreSQL store without a data directory has none
        store.snapshots.join()  # the quantizer is trained by the snapshot builder, in the background
    info = store.info("big")
    assert info["index"]["kind"] == "ivf" and info["index"]["nlist"] > 0 and info["passages"] == 1100
    for i in (0, 517, 1099):
        res = store.search("big", texts[i], top_k=3)
        assert res[0]["id"] == str(i) and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    store.close()


def _writer(sc, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "store_writer.py"), *map(str, args)],
                            env=sc.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_writer_processes_lose_nothing(tiny_sidecar, client, store_location):
    store = CollectionStore(store_location, client)
    store.create("shared")
    procs = [_writer(tiny_sidecar, "docs", store_location, "shared", f"w{k}", 12, 5) for k in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    info = store.info("shared")
    assert info["documents"] == 4 * 12 * 5 + 1 and info["passages"] == info["documents"]
    for k in range(4):
        for n in range(60):
            assert store.get_document("shared", f"w{k}-{n}")["metadata"]["writer"] == f"w{k}"
    # every write is searchable from this process, which wrote none of them
    res = store.search("shared", "document w2 11 4 about topic 4", top_k=500)
    assert len(res) == 241 and len({r["id"] for r in res}) == 241
    assert "shared document last written by" in store.get_document("shared", "shared")["text"]
    store.close()


def test_a_writer_killed_mid_write_leaves_a_readable_collection(tiny_sidecar, client, store_location):
    store = CollectionStore(store_location, client)
    store.create("crash", {"passage_words": 8, "overlap_words": 0})
    per_batch = 400
    for round_ in range(3):
        writer = _writer(tiny_sidecar, "big", store_location, "crash", f"r{round_}", 0, per_batch)
        committed = 0
        deadline = time.monotonic() + 60
        while committed < 2 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            committed += 1
        time.sleep(0.05 + 0.1 * round_)  # somewhere inside the next transaction
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert committed == 2, writer.stderr.read()[-3000:]
        if not is_postgres(store_location):
            assert query(store_location, "PRAGMA integrity_check") == [("ok",)]
        per_doc = query(store_location, "SELECT count(*) FROM passages GROUP BY doc_id")
        assert {n for (n,) in per_doc} == {3}  # no half-written document
        ndocs = query(store_location, "SELECT count(*) FROM documents")[0][0]
        assert ndocs % per_batch == 0 and ndocs >= (round_ + 1) * 2 * per_batch  # whole batches only
        # the change log holds exactly the committed passages: nothing of the killed transaction
        assert query(store_location, "SELECT count(*) FROM changes")[0][0] == 3 * ndocs
        res = store.search("crash", "w1 w2 w3", top_k=5)
        assert len(res) == 5 and store.info("crash")["documents"] == ndocs
    store.close()


def test_the_original_module_level_api(tiny_sidecar, tiny_st, monkeypatch):
    import compat
    from compat import fallback
    from tests.helpers import new_namespace

    for key in ("SHM_EMBED_NAMESPACE", "SHM_EMBED_MODEL"):
        monkeypatch.setenv(key, tiny_sidecar.env[key])
    monkeypatch.setattr(fallback, "_default", {})
    model = fallback.get_embedding_model()
    assert model is fallback.get_embedding_client()  # one client (one ring) for both
    assert fallback.is_using_ipc_embedding() and fallback.get_active_operations_count() == 0
    vecs = fallback.generate_embeddings(DOCS, batch_size=2)
    assert vecs.shape == (4, tiny_st.get_embedding_dimension())
    assert min(cosine_rows(vecs, tiny_st.encode(DOCS))) >= 0.99999
    # the original's retrieval calls take no client: they look the same one up
    index, _, metadata = compat.build_vector_index(DOCS)
    assert index.client is model
    hits = compat.search_index(DOCS[2], index.index, metadata, 2)  # a bare FAISS index: no client with it
    assert [h["id"] for h in hits][0] == 2 and [h["rank"] for h in hits] == [1, 2]
    model.close()

    # no sidecar on the namespace: a local model, as the original fell back at connect time
    monkeypatch.setenv("SHM_EMBED_NAMESPACE", new_namespace())
    monkeypatch.setattr(fallback, "_default", {})
    local = fallback.get_embedding_model()
    assert not fallback.is_using_ipc_embedding()
    assert min(cosine_rows(local.generate_embeddings(DOCS), tiny_st.encode(DOCS))) >= 0.99999


def test_filters_and_odd_documents_mean_the_same_in_both_stores(store_location):
    store = CollectionStore(store_location, FixedVectorClient(), filter_max_values=1000)
    store.create("kb")
    store.upsert("kb", [{"id": str(i), "text": f"doc {i}", "metadata": {"n": i, "b": i % 2 == 0, "s": str(i)}}
                        for i in range(12)])

    def ids(flt):
        return sorted(int(r["id"]) for r in store.search("kb", "q", 50, flt))

    assert ids({"n": list(range(3, 1003))}) == list(range(3, 12))
    assert ids({**{f"k{i}": None for i in range(999)}, "n": 5}) == [5]  # 1,000 keys: a balanced AND
    assert ids({"b": True, "n": [1.0, 2, 3, 4]}) == [2, 4]  # booleans and numbers compare as in JSON
    assert ids({"b": 1}) == [] and ids({"b": [0, 1.0]}) == [] and ids({"n": True}) == [] and ids({"n": False}) == []
    assert ids({"b": [False, 1], "n": [0, 1, 2, 3]}) == [1, 3]  # true is not 1, nor false 0, on either store
    assert ids({"s": "7"}) == [7] and ids({"s": 7}) == [] and ids({"n": "7"}) == []
    assert ids({"missing": [None, "x"]}) == list(range(12)) and ids({"s": ["x", "3"]}) == [3]
    for bad in ("x\0", "\ud83d", "x\udc00"):  # nothing stored holds them: refused alike, naming the place
        with pytest.raises(InvalidInput, match=r"'filter\.s\[1\]'"):
            ids({"s": ["3", bad]})
    assert ids({}) == list(range(12))
    with pytest.raises(InvalidInput):
        store.search("kb", "q", 5, {"n": float("nan")})
    # metadata comes back as it was written, key order included
    meta = {"z": 1, "a": [1.5, {"y": None, "b": "é"}], "m": True}
    store.upsert("kb", [{"id": "meta", "text": "with metadata", "url": "u:meta", "metadata": meta}])
    got = store.get_document("kb", "meta")
    assert got["metadata"] == meta and list(got["metadata"]) == ["z", "a", "m"] and got["url"] == "u:meta"
    with pytest.raises(InvalidInput, match="metadata"):
        store.upsert("kb", [{"text": "nan", "metadata": {"x": float("nan")}}])  # no JSON: refused by both
    with pytest.raises(CollectionNotFound):
        store.get_document("kb", "no\0such")
    # PostgreSQL's text cannot hold U+0000, nor UTF-8 half a character: refused by both stores, nothing written
    good = {"id": "ok", "text": "fine", "url": "u:ok", "metadata": {"k": "v", "deep": [{"x": "y"}]}}
    for bad, what in (("a NUL \0 inside", "U\\+0000"), ("half \ud83d an emoji", "surrogate")):
        other = {**good, "id": "bad"}
        for doc, where in (({**other, "text": bad}, "documents[1].text"), ({**other, "id": bad}, "documents[1].id"),
                           ({**other, "url": bad}, "documents[1].url"),
                           ({**other, "metadata": {"k": bad}}, "documents[1].metadata.k"),
                           ({**other, "metadata": {bad: 1}}, "documents[1].metadata"),
                           ({**other, "metadata": {"deep": [{"x": bad}]}}, "documents[1].metadata.deep[0].x")):
            with pytest.raises(InvalidInput, match=what) as err:
                store.upsert("kb", [good, doc])
            assert where in str(err.value)
    assert store.info("kb")["documents"] == 13
    store.close()


def test_a_surrogate_already_stored_is_answered_by_both_stores(store_location, tmp_path):
    """Metadata with half a character, stored before text was checked (here
    written straight into the table), never fails a search, a filter or a
    read over HTTP: U+FFFD stands in for it."""
    from falcon import testing

    from shm_protocol.config import Settings
    from web.app import create_app

    pg = is_postgres(store_location)
    settings = Settings.from_env({}, data_dir=str(tmp_path / "web"), collections_url=store_location if pg else "")
    if not pg:
        settings = settings.replace(data_dir=store_location)

    class Client(FixedVectorClient):  # what the app asks of a client beyond a store's needs
        def stats(self):
            raise NotImplementedError

    store = CollectionStore(store_location, FixedVectorClient())
    store.create("kb")
    store.upsert("kb", [{"id": str(i), "text": f"doc {i}", "metadata": {"k": "v", "n": i}} for i in range(3)])
    with store.db.write() as conn:
        conn.execute("UPDATE documents SET metadata = " + ("%s::json WHERE id = '1'" if pg else "? WHERE id = '1'"),
                     ('{"k": "\\ud83d", "\\udc00x": [1], "n": 1, "e": "\\ud83d\\ude00", "lit": "\\\\ud83d"}',))
    store.close()
    app = testing.TestClient(create_app(Client(), settings))
    response = app.simulate_post("/collections/kb/search", json={"query": "an unrelated query", "top_k": 10})
    assert response.status_code == 200, response.text
    got = {x["id"]: x["metadata"] for x in response.json["results"]}
    assert got["1"] == {"k": "\ufffd", "\ufffdx": [1], "n": 1, "e": "\N{GRINNING FACE}", "lit": "\\ud83d"}
    assert got["0"] == {"k": "v", "n": 0}
    response = app.simulate_get("/collections/kb/documents/1")
    assert response.status_code == 200 and response.json["metadata"]["k"] == "\ufffd"
    for flt, want in (({"k": "v"}, {"0", "2"}), ({"n": 1}, {"1"}), ({"k": None}, set()),
                      ({"e": "\N{GRINNING FACE}"}, {"1"}), ({"lit": "\\ud83d"}, {"1"})):
        response = app.simulate_post("/collections/kb/search", json={"query": "q", "filter": flt})
        assert response.status_code == 200, (flt, response.text)
        assert {x["id"] for x in response.json["results"]} == want, flt
    app.app.ctx.retrieval.store.close()


def _batch(rng, tag: str, n: int) -> tuple[list, np.ndarray]:
    """``n`` documents of two 8-word passages each, with random unit vectors."""
    raw = [{"id": f"{tag}-{i}", "text": " ".join(f"w{j}" for j in range(16))} for i in range(n)]
    docs = parse_documents(raw, CollectionOptions(passage_words=8, overlap_words=0))
    vecs = rng.standard_normal((2 * n, 8)).astype(np.float32)
    return docs, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_writers_racing_a_replaying_reader_leave_it_no_change_short(store_location):
    """A reader replays the change log past the highest sequence number it has
    seen; a store that let a later number become visible before an earlier one
    committed would leave it without passages it never looks at again.

    First, deterministically: while one writer's transaction is open (its
    change-log entries taken, not committed), a second writer of the
    collection must wait, not commit entries numbered after the first's.
    Then four writers commit batches at once while the reader replays between
    their commits: its index must end up holding every passage."""
    batches = 25  # per writer: each commit is another chance to become visible out of order
    stores = [CollectionStore(store_location, FixedVectorClient()) for _ in range(5)]
    reader, writers = stores[0], stores[1:]
    reader.create("race", {"index": "flat"})
    probe = np.ones(8, np.float32) / np.sqrt(8)
    rng = np.random.default_rng(0)

    first, second = _batch(rng, "first", 3), _batch(rng, "second", 3)
    later = threading.Thread(target=writers[1].write_embedded, args=("race", *second))
    db = writers[0].db
    with db.write() as conn:
        row = writers[0]._row(conn, "race", lock=True)
        db.insert_documents(conn, row.cid, first[0], first[1], time.time())
        later.start()
        later.join(1.0)
        assert later.is_alive(), "a second writer committed while the first one's transaction was open"
        assert reader.search_vector("race", probe, 10) == []  # nothing committed yet
    later.join(60)
    assert not later.is_alive()
    reader.search_vector("race", probe, 1)
    assert reader._loaded["race"].index.ntotal == 12

    errors: list[BaseException] = []

    def write(k: int) -> None:
        rng = np.random.default_rng(k)
        try:
            for b in range(batches):
                writers[k].write_embedded("race", *_batch(rng, f"w{k}-{b}", 20))
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    syncs = 0
    while any(t.is_alive() for t in threads):
        reader.search_vector("race", probe, 1)
        syncs += 1
    for thread in threads:
        thread.join()
    assert not errors, errors
    reader.search_vector("race", probe, 1)
    total = 12 + 4 * batches * 20 * 2
    assert reader.info("race")["passages"] == total
    assert syncs > 1 and reader._loaded["race"].index.ntotal == total, "the reader's replay skipped changes"
    for s in stores:
        s.close()


def test_chinese_and_mixed_documents_are_embedded_to_their_end(real_sidecar, tmp_path):
    """A Chinese document was one passage (split at spaces, it has none) of
    which the model read 256 tokens: a phrase near its end was never found.
    Passages now follow the model's tokens, every one inside its window."""
    zh = ("共享内存让工作进程和模型进程交换数据，无需复制。"
          "信号量唤醒等待的工作进程，它读取答案后继续处理下一个请求。") * 60
    end_zh = "北京烤鸭是一道著名的菜，用果木炉子烤制。"
    end_en = "The lighthouse keeper paints the stairs blue every spring."
    th = "หน่วยความจำที่ใช้ร่วมกันช่วยให้กระบวนการทำงานแลกเปลี่ยนข้อมูลได้โดยไม่ต้องคัดลอก " * 150
    with client_for(real_sidecar) as client:
        store = CollectionStore(tmp_path, client)
        store.create("zh")
        store.upsert("zh", [{"id": "zh", "text": zh + end_zh}, {"id": "mixed", "text": zh + th + end_en},
                            {"id": "other", "text": "Paris is the capital of France."}])
        tok = client.text_tokenizer()[0]
        for doc_id, phrase in (("zh", end_zh), ("mixed", end_en)):
            passages = store.prepare("zh", [{"id": doc_id, "text": store.get_document("zh", doc_id)["text"]}])[0]
            assert len(passages.spans) > 10
            assert max(len(e.ids) for e in tok.encode(passages.passages)) <= tok.max_seq_length
            best = {r["id"]: r["passage"] for r in store.search("zh", phrase, top_k=3)}
            assert phrase in best[doc_id]  # its best passage is the one with the phrase
        store.close()
