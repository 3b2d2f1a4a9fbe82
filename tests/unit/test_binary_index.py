"""Binary collections' index (retrieval/faiss_index.py, retrieval/collections/snapshot_index.py):
sign-bit codes searched by Hamming distance, the candidates rescored with float vectors, in a
private index and in a snapshot plus its delta, against a brute-force reference in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.collections.documents import CollectionOptions
from retrieval.faiss_index import PassageIndex
from shm_protocol.errors import InvalidInput

DIM = 64


def _unit(rng, n: int, dim: int = DIM) -> np.ndarray:
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def brute_force(query, ids, vecs, k, multiplier, allowed=None):
    """The reference: Hamming distances of the sign bits (unpacked, counted in numpy), the
    ``multiplier * k`` nearest (equal distances by id), rescored by float inner product
    (equal scores by id), cut at ``k``."""
    if allowed is not None:
        keep = np.isin(ids, allowed)
        ids, vecs = ids[keep], vecs[keep]
    k = min(k, len(ids))
    distances = ((vecs > 0) != (query > 0)).sum(axis=1)
    m = min(len(ids), k * multiplier)
    chosen = np.lexsort((ids, distances))[:m]
    scores = np.array([float(np.dot(vecs[row].astype(np.float64), query)) for row in chosen])
    order = np.lexsort((ids[chosen], -scores))[:k]
    return ids[chosen][order], scores[order]


def _check(index, query, ids, vecs, k, multiplier, allowed=None):
    got_scores, got_ids = index.search(query, k, allowed)
    want_ids, want_scores = brute_force(query, ids, vecs, k, multiplier, allowed)
    assert got_ids.tolist() == want_ids.tolist()
    assert np.allclose(got_scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("multiplier", [1, 4])
def test_a_binary_index_answers_as_the_brute_force_reference(multiplier):
    rng = np.random.default_rng(5)
    vecs = _unit(rng, 2000)
    ids = rng.permutation(np.arange(10, 4010, 2))  # added out of id order
    index = PassageIndex(DIM, binary=True, rescore_multiplier=multiplier)
    index.add(ids, vecs)
    gone = ids[::9]
    index.remove(gone)
    live = ~np.isin(ids, gone)
    assert index.ntotal == int(live.sum()) and index.kind == "binary"
    for query in _unit(rng, 8):
        for k, allowed in ((10, None), (1, None), (50, None), (10, ids[::3]), (5, ids[:20]), (3, gone[:4])):
            _check(index, query, ids[live], vecs[live], k, multiplier, allowed)


def test_a_binary_index_keeps_the_defined_order_among_equal_codes_and_scores():
    """Many passages of one vector (the same code, the same score) around the cut: the smallest ids win."""
    rng = np.random.default_rng(8)
    same = _unit(rng, 1)[0]
    ids = np.arange(300, 100, -5)  # the larger ids added first
    index = PassageIndex(DIM, binary=True, rescore_multiplier=2)
    index.add(np.arange(1000, 1300), _unit(rng, 300))
    index.add(ids, np.repeat(same[None], len(ids), 0))
    for k in (1, 7, 40):
        scores, got = index.search(same, k)
        assert got.tolist() == np.sort(ids)[:k].tolist()
        assert len(set(scores.tolist())) == 1


def test_a_binary_snapshot_and_its_delta_answer_as_one_binary_index(tmp_path):
    """A written, memory-mapped binary snapshot, a delta of later passages and hidden ids: the
    reference's answers, filters included (what a store gives after replaying changes)."""
    import faiss

    from retrieval.collections.snapshot_disk import write_snapshot
    from retrieval.collections.snapshot_files import FORMAT, VECTORS_FILE
    from retrieval.collections.snapshot_index import LayeredIndex, Snapshot
    from retrieval.faiss_index import binary_codes

    rng = np.random.default_rng(13)
    vecs = _unit(rng, 3000)
    ids = np.arange(1, 3001) * 3
    codes = faiss.IndexBinaryFlat(DIM)
    codes.add(binary_codes(vecs[:2000]))
    meta = {"format": FORMAT, "generation": 1, "cid": 7, "created": 1.5, "dim": DIM, "seq": 2000, "kind": "binary",
            "nlist": 0, "ntotal": 2000, "trained_at": 0}
    path = write_snapshot(tmp_path, 1, codes, ids[:2000], meta, vecs[:2000])
    assert (path / VECTORS_FILE).stat().st_size >= 2000 * DIM * 4
    snap = Snapshot(path, cid=7, dim=DIM, created=1.5)
    assert snap.kind == "binary" and isinstance(snap.vectors, np.memmap)
    layered = LayeredIndex(snap, nprobe=4, rescore_multiplier=3)
    layered.add(ids[2000:], vecs[2000:])
    gone = np.concatenate([ids[:2000:7], ids[2000::11]])
    layered.remove(gone)
    live = ~np.isin(ids, gone)
    assert layered.ntotal == int(live.sum())
    for query in _unit(rng, 8):
        for k, allowed in ((10, None), (100, None), (10, ids[::5]), (4, ids[1990:2030]), (3, gone[:5])):
            _check(layered, query, ids[live], vecs[live], k, 3, allowed)
    snap.release()


def test_a_damaged_vectors_file_or_an_older_format_makes_the_binary_snapshot_unusable(tmp_path):
    import json

    import faiss

    from retrieval.collections.snapshot_disk import write_snapshot
    from retrieval.collections.snapshot_files import FORMAT, VECTORS_FILE, SnapshotUnusable
    from retrieval.collections.snapshot_index import Snapshot
    from retrieval.faiss_index import binary_codes

    vecs = _unit(np.random.default_rng(2), 50)
    codes = faiss.IndexBinaryFlat(DIM)
    codes.add(binary_codes(vecs))
    meta = {"format": FORMAT, "generation": 1, "cid": 7, "created": 1.5, "dim": DIM, "seq": 50, "kind": "binary",
            "nlist": 0, "ntotal": 50, "trained_at": 0}
    path = write_snapshot(tmp_path, 1, codes, np.arange(50), meta, vecs)
    target = path / VECTORS_FILE
    target.chmod(0o600)
    data = bytearray(target.read_bytes())
    data[-7] ^= 0x40
    target.write_bytes(bytes(data))
    with pytest.raises(SnapshotUnusable, match="checksum"):
        Snapshot(path, cid=7, dim=DIM, created=1.5)
    # A generation written before binary snapshots (format 3) is refused, so it gets rebuilt.
    meta_file = path / "meta.json"
    meta_file.chmod(0o600)
    meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), format=FORMAT - 1)))
    with pytest.raises(SnapshotUnusable, match=f"not a snapshot's of format {FORMAT}"):
        Snapshot(path, cid=7, dim=DIM, created=1.5)


@pytest.mark.parametrize("options, message", [
    ({"index": "hnsw"}, "'index' must be one of auto, flat, ivf, binary"),
    ({"index": ["binary"]}, "'index' must be one of auto, flat, ivf, binary"),
    ({"index": "binary", "rescore_multiplier": 0}, "'rescore_multiplier' must be an integer from 1 to 100"),
    ({"index": "binary", "rescore_multiplier": 101}, "'rescore_multiplier' must be an integer from 1 to 100"),
    ({"index": "binary", "rescore_multiplier": "4"}, "'rescore_multiplier' must be an integer"),
    ({"index": "binary", "rescore_multiplier": True}, "'rescore_multiplier' must be an integer"),
])
def test_bad_index_options_are_refused_with_the_accepted_values(options, message):
    with pytest.raises(InvalidInput, match=message):
        CollectionOptions.from_dict(options)


def test_binary_options_are_kept():
    opts = CollectionOptions.from_dict({"index": "binary", "rescore_multiplier": 10})
    assert (opts.index, opts.rescore_multiplier) == ("binary", 10)
    assert CollectionOptions.from_dict(None).rescore_multiplier == 4


def test_over_http_a_bad_index_kind_or_multiplier_is_a_422_and_a_binary_collection_answers(tmp_path):
    from falcon import testing

    from shm_protocol.config import Settings
    from tests.unit.test_web_app import FakeClient
    from web.app import create_app

    settings = Settings.from_env({}, data_dir=str(tmp_path / "data"))
    app = testing.TestClient(create_app(FakeClient(), settings))
    r = app.simulate_put("/collections/b", json={"options": {"index": "hnsw"}})
    assert r.status_code == 422 and "auto, flat, ivf, binary" in r.json["error"]["message"], r.json
    r = app.simulate_put("/collections/b", json={"options": {"index": "binary", "rescore_multiplier": 1000}})
    assert r.status_code == 422 and "'rescore_multiplier'" in r.json["error"]["message"], r.json
    r = app.simulate_put("/collections/b", json={"options": {"index": "binary", "rescore_multiplier": 2}})
    assert r.status_code == 201 and r.json["index"] == {"kind": "binary", "nlist": 0, "nprobe": 0,
                                                        "rescore_multiplier": 2}, r.json
    texts = ["blue sky", "green grass", "red fire", "blue sea", "white snow"]
    r = app.simulate_post("/collections/b/documents", json={"documents": [{"id": t, "text": t} for t in texts]})
    assert r.status_code == 200, r.json
    r = app.simulate_post("/collections/b/search", json={"query": "blue sky", "top_k": 2})
    assert r.status_code == 200 and r.json["results"][0]["id"] == "blue sky", r.json
