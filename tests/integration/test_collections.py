"""Collections and in-memory indexes with real FAISS, a real sidecar and
real writer processes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from retrieval import CollectionStore, build_vector_index, search_index
from retrieval.errors import CollectionConflict, CollectionNotFound
from retrieval.store import DB_FILE
from shm_protocol.errors import InvalidInput
from tests.helpers import REPO, client_for, cosine_rows, start_sidecar, stop_and_check

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
    for r in res:
        assert r["score"] == pytest.approx(float(want[r["id"]]), abs=1e-4)
        assert r["relevance_score"] == r["score"] and r["url"] == f"https://example.org/{r['id']}"
        assert r["full_content"] == DOCS[r["id"]] and r["length"] == len(DOCS[r["id"]])
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


def test_collection_lifecycle_survives_a_restart(client, tiny_st, tmp_path):
    store = CollectionStore(tmp_path, client)
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

    again = CollectionStore(tmp_path, client)  # a restart: a new process would do the same
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


def test_a_collection_of_another_model_is_refused(client, tmp_path, tmp_path_factory):
    from sidecar.tiny import make_tiny_model

    store = CollectionStore(tmp_path, client)
    store.create("kb")
    store.upsert("kb", DOCS)
    other_model = make_tiny_model(tmp_path_factory.mktemp("other"), hidden=48)
    sc = start_sidecar(tmp_path, str(other_model), SHM_EMBED_TORCH_THREADS="1")
    try:
        other = client_for(sc)
        foreign = CollectionStore(tmp_path, other)
        with pytest.raises(CollectionConflict, match="48"):
            foreign.search("kb", "query")
        with pytest.raises(CollectionConflict):
            foreign.upsert("kb", ["more"])
        assert foreign.info("kb")["documents"] == 4  # readable, not writable
        foreign.close()
        other.close()
    finally:
        stop_and_check(sc)


def test_ivf_collection_trains_once_and_finds_exact_matches(client, tmp_path):
    store = CollectionStore(tmp_path, client, nprobe=8)
    store.create("big", {"index": "ivf"})
    texts = [f"record {i} of the catalogue: item {i * 7 % 1000} in aisle {i % 37}" for i in range(1100)]
    store.upsert("big", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
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


def test_concurrent_writer_processes_lose_nothing(tiny_sidecar, client, tmp_path):
    store = CollectionStore(tmp_path, client)
    store.create("shared")
    procs = [_writer(tiny_sidecar, "docs", tmp_path, "shared", f"w{k}", 12, 5) for k in range(4)]
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


def test_a_writer_killed_mid_write_leaves_a_readable_collection(tiny_sidecar, client, tmp_path):
    store = CollectionStore(tmp_path, client)
    store.create("crash", {"passage_words": 8, "overlap_words": 0})
    per_batch = 400
    for round_ in range(3):
        p = _writer(tiny_sidecar, "big", tmp_path, "crash", f"r{round_}", 0, per_batch)
        committed = 0
        deadline = time.monotonic() + 60
        while committed < 2 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            committed += 1
        time.sleep(0.05 + 0.1 * round_)  # somewhere inside the next transaction
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert committed == 2, p.stderr.read()[-3000:]
        db = sqlite3.connect(tmp_path / DB_FILE)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        per_doc = db.execute("SELECT count(*) FROM passages GROUP BY doc_id").fetchall()
        assert {n for (n,) in per_doc} == {3}  # no half-written document
        ndocs = db.execute("SELECT count(*) FROM documents").fetchone()[0]
        assert ndocs % per_batch == 0 and ndocs >= (round_ + 1) * 2 * per_batch  # whole batches only
        db.close()
        res = store.search("crash", "w1 w2 w3", top_k=5)
        assert len(res) == 5 and store.info("crash")["documents"] == ndocs
    store.close()


def test_the_original_module_level_api(tiny_sidecar, tiny_st, monkeypatch):
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
    model.close()

    # no sidecar on the namespace: a local model, as the original fell back at connect time
    monkeypatch.setenv("SHM_EMBED_NAMESPACE", new_namespace())
    monkeypatch.setattr(fallback, "_default", {})
    local = fallback.get_embedding_model()
    assert not fallback.is_using_ipc_embedding()
    assert min(cosine_rows(local.generate_embeddings(DOCS), tiny_st.encode(DOCS))) >= 0.99999
