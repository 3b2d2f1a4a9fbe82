"""Collections whose index is ``binary``, through the store, on SQLite and PostgreSQL
(the PostgreSQL cases skip where no server can be run): answers equal a brute-force
reference (Hamming candidates, then float rescoring, in numpy) from a snapshot plus
its delta, with filters, and from the tables alone; and on the real model, recall@10
on the labelled set (bench/data/labelled_retrieval.jsonl) is at least 0.95 of a
flat collection's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from retrieval.collections.documents import Document
from retrieval.collections.snapshot_disk import generation_dir
from retrieval.collections.snapshot_files import VECTORS_FILE
from retrieval.collections.snapshot_index import LayeredIndex
from retrieval.collections.store import CollectionStore, passages_asked
from tests.helpers import REPO
from tests.snapshot_worker import VectorClient
from tests.unit.test_binary_index import brute_force

DIM = 64
MULTIPLIER = 3
NEVER = 10**9  # no build but the ones the test asks for
LABELLED = REPO / "bench" / "data" / "labelled_retrieval.jsonl"


def _unit(rng, n: int) -> np.ndarray:
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _docs(ids) -> list[Document]:
    return [Document(i, "x", None, {"group": int(i[1:]) % 3}, [(0, 1)]) for i in ids]


def _open(location: str, data: Path, **kwargs) -> CollectionStore:
    return CollectionStore(location, VectorClient(DIM), snapshot_dir=data, snapshot_delta=NEVER, **kwargs)


def _reference(store: CollectionStore, name: str, query, top_k: int, group=None) -> list[tuple[str, float]]:
    """What a binary collection of the live passages answers, computed from the tables in numpy."""
    with store.db.read() as conn, store.db.consistent(conn):
        cid = store._row(conn, name).cid
        chunks = list(store.db.stream_passages(conn, cid, 4096))
        pids = np.concatenate([ids for ids, _ in chunks])
        vecs = np.frombuffer(b"".join(blob for _, blob in chunks), dtype="<f4").reshape(-1, DIM)
        owner = {pid: hit[0] for pid, hit in store.db.passages_by_pid(conn, pids).items()}
    allowed = None if group is None else np.array([p for p in pids if int(owner[p][1:]) % 3 == group])
    limit = len(pids) if allowed is None else len(allowed)
    found, scores = brute_force(query, pids, vecs, passages_asked(top_k, limit), MULTIPLIER, allowed)
    return [(owner[p], float(s)) for p, s in zip(found.tolist(), scores.tolist())][:top_k]


def _answer(store: CollectionStore, name: str, query, top_k: int, group=None) -> list[tuple[str, float]]:
    hits = store.search_vector(name, query, top_k, None if group is None else {"group": group})
    return [(h["id"], h["score"]) for h in hits]


def _same(got, want) -> None:
    assert [d for d, _ in got] == [d for d, _ in want], (got, want)
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


def test_binary_answers_equal_the_reference_from_a_snapshot_and_delta_and_from_the_tables(store_location, tmp_path):
    rng = np.random.default_rng(31)
    store = _open(store_location, tmp_path / "host")
    tables = _open(store_location, tmp_path / "other", snapshots=False)  # a private index read from the tables
    try:
        info, _ = store.create("bin", {"index": "binary", "rescore_multiplier": MULTIPLIER})
        assert info["index"]["kind"] == "binary" and info["options"]["rescore_multiplier"] == MULTIPLIER
        first = [f"d{i}" for i in range(600)]
        store.write_embedded("bin", _docs(first), _unit(rng, 600))
        with store.db.read() as conn:
            cid = store._row(conn, "bin").cid
        meta = store.snapshots.build(cid)
        assert meta["kind"] == "binary" and meta["ntotal"] == 600
        assert (generation_dir(store.snapshots.collection_dir(cid), meta["generation"]) / VECTORS_FILE).exists()
        # After the snapshot: new documents, replaced ones (snapshot passages hidden), deleted ones.
        store.write_embedded("bin", _docs([f"d{i}" for i in range(600, 800)]), _unit(rng, 200))
        store.write_embedded("bin", _docs([f"d{i}" for i in range(0, 600, 25)]), _unit(rng, 24))
        for doc_id in ("d1", "d2", "d601", "d777"):
            store.delete_document("bin", doc_id)
        for query in _unit(rng, 6):
            for top_k, group in ((10, None), (1, None), (40, None), (10, 1), (5, 2)):
                want = _reference(store, "bin", query, top_k, group)
                _same(_answer(store, "bin", query, top_k, group), want)
                _same(_answer(tables, "bin", query, top_k, group), want)
        store.snapshots.join()  # a build asked for meanwhile (none is due) would be done now
        _answer(store, "bin", _unit(rng, 1)[0], 10)
        layered = store._loaded["bin"].index
        assert isinstance(layered, LayeredIndex) and layered.generation == meta["generation"] and layered.pending > 0
        assert tables._loaded["bin"].index.kind == "binary"
        # A second generation folds the delta in: still the same answers.
        assert store.snapshots.build(cid)["generation"] == meta["generation"] + 1
        query = _unit(rng, 1)[0]
        _same(_answer(store, "bin", query, 10), _reference(store, "bin", query, 10))
        assert store._loaded["bin"].index.pending == 0
    finally:
        tables.close()
        store.close()


def _labelled() -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "query"], [r for r in rows if r["kind"] == "passage"]


class ModelClient:
    """The real model, in this process, as the store's client (stores used as a library take any
    object with ``info()`` and ``embed()``): no sidecar to start for one batch of vectors."""

    def __init__(self, model):
        self.model = model
        self.dim = int(model.encode(["a probe"]).shape[1])

    def info(self) -> dict:
        return {"model": "all-MiniLM-L6-v2", "dimension": self.dim}

    def embed(self, texts, normalize=True, **_):
        return self.model.encode(list(texts), normalize_embeddings=normalize, batch_size=64)


def test_binary_recall_at_10_is_at_least_0_95_of_flat_on_the_labelled_set(real_model, tmp_path):
    queries, passages = _labelled()
    assert len(queries) == 40 and len(passages) == 400
    client = ModelClient(real_model)
    store = CollectionStore(tmp_path / "data", client, snapshot_delta=NEVER)
    try:
        documents = [Document(p["id"], p["text"], None, {}, [(0, len(p["text"]))]) for p in passages]
        vectors = client.embed([p["text"] for p in passages])
        qvecs = client.embed([q["text"] for q in queries])
        recall = {}
        for name in ("flat", "binary"):
            store.create(name, {"index": name})
            store.write_embedded(name, documents, vectors)
            hits = [{h["id"] for h in store.search_vector(name, qv, 10)} & set(q["relevant"])
                    for q, qv in zip(queries, qvecs)]
            recall[name] = sum(len(h) / len(q["relevant"]) for h, q in zip(hits, queries)) / len(queries)
    finally:
        store.close()
    print(f"recall@10 on {LABELLED.name}: {recall}")
    assert recall["flat"] > 0.5, recall  # the set and the model are what they should be
    assert recall["binary"] >= 0.95 * recall["flat"], recall
