"""Passages, HTML extraction, the address policy, options and the FAISS index."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.collections.store import CollectionOptions, parse_documents
from retrieval.errors import FetchRefused
from retrieval.faiss_index import PassageIndex, nlist_for, train_centroids
from retrieval.passages import PassageSplitter, split_passages
from retrieval.websearch.extract import extract
from retrieval.websearch.fetch import AddressPolicy
from shm_protocol.errors import InvalidInput


def test_passages_cover_the_text_with_overlap():
    text = " ".join(f"w{i}" for i in range(250))
    spans = split_passages(text, words=100, overlap=20)
    words = [text[a:b].split() for a, b in spans]
    assert [len(w) for w in words] == [100, 100, 90]
    assert words[0][-20:] == words[1][:20] and words[1][-20:] == words[2][:20]
    assert words[-1][-1] == "w249" and words[0][0] == "w0"
    assert split_passages("  \n ") == []
    assert split_passages("one two", words=100, overlap=20) == [(0, 7)]
    with pytest.raises(ValueError):
        split_passages("x", words=10, overlap=10)


ZH = ("共享内存让工作进程和模型进程交换数据，无需复制。信号量唤醒等待的工作进程，它读取答案后继续处理下一个请求。"
      "每个集合把长文档切成段落，每段单独编码，检索时返回最相近的段落。")
TH = ("หน่วยความจำที่ใช้ร่วมกันช่วยให้กระบวนการทำงานแลกเปลี่ยนข้อมูลได้โดยไม่ต้องคัดลอก "
      "สัญญาณปลุกกระบวนการที่รอ แล้วมันอ่านคำตอบและทำงานต่อ ")
EN = "Shared memory lets the worker hand texts to the model without a copy. A semaphore wakes it. "


@pytest.fixture(scope="module")
def minilm_tok():
    from shm_protocol.model_files import bundled_model_path, tokenizer_file
    from shm_protocol.tokenizer import WorkerTokenizer

    return WorkerTokenizer(str(tokenizer_file(bundled_model_path())), 256)


@pytest.mark.parametrize("text", [ZH * 40, TH * 200, (ZH + EN + TH) * 15, EN * 60],
                         ids=["chinese", "thai", "mixed", "english"])
def test_passages_by_tokens_fit_the_window_and_cover_any_script(minilm_tok, text):
    window = minilm_tok.window()
    spans = PassageSplitter(offsets=minilm_tok.token_offsets, window=window)(text)
    assert len(spans) > 3
    counts = [len(e.ids) for e in minilm_tok.encode([text[a:b] for a, b in spans])]
    assert max(counts) <= minilm_tok.max_seq_length and not any(e.overflowing for e in minilm_tok.encode(
        [text[a:b] for a, b in spans]))
    assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        assert a0 < a1 < b0 < b1  # every character in a passage, neighbours overlapping
    if text.startswith(EN):  # the word cap binds first, and cuts fall between words
        words = [len(text[a:b].split()) for a, b in spans]
        assert max(words) == 120 and all(text[b - 1] != " " and text[b] == " " for a, b in spans[:-1])
    elif text.startswith(ZH):  # the window binds: nearly full passages
        assert min(counts[:-1]) > 0.8 * minilm_tok.max_seq_length


def test_a_window_cut_prefers_a_sentence_end_and_a_prompt_narrows_it(minilm_tok):
    text = EN * 200
    split = PassageSplitter(2000, 100, offsets=minilm_tok.token_offsets, window=minilm_tok.window())
    assert all(text[b - 1] == "." for a, b in split(text)[:-1])
    assert minilm_tok.window("Represent this passage for retrieval: ") < minilm_tok.window() == 254


PAGE = b"""<!doctype html><html><head><title> The Title </title>
<style>body { color: red }</style><script>var secret = "script words";</script></head>
<body><nav><a href="/">Home</a> <a href="/a">About</a></nav>
<header>Site banner words</header>
<div class="sidebar">Sidebar words</div>
<main><h1>Main heading</h1><p>First   paragraph
of the article.</p><ul><li>item one</li><li>item two</li></ul>
<div><a href="/x">link</a> <a href="/y">list</a> <a href="/z">only</a></div>
<p>Second paragraph with a <a href="/l">link</a> inside.</p></main>
<footer>Footer words</footer></body></html>"""


def test_extract_keeps_the_main_text_and_drops_boilerplate():
    title, text = extract(PAGE)
    assert title == "The Title"
    assert text.splitlines() == ["Main heading", "First paragraph of the article.", "item one", "item two",
                                 "Second paragraph with a link inside."]
    for junk in ("script words", "color", "Home", "banner", "Sidebar", "Footer", "only"):
        assert junk not in text


def test_extract_plain_text_charsets_and_garbage():
    assert extract(b"a  b\n\n c", "text/plain") == ("", "a b\nc")
    title, text = extract("<p>caf\u00e9 na\u00efve</p>".encode("latin-1"), charset="latin-1")
    assert text == "caf\u00e9 na\u00efve"
    assert extract(b"") == ("", "")
    assert isinstance(extract(b"\x00\xff\xfe garbage")[1], str)


@pytest.mark.parametrize("addr,why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.5", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "not a public"),
    ("::ffff:127.0.0.1", "loopback"), ("fc00::1", "private"),
])
def test_policy_refuses_what_is_not_public(addr, why):
    assert why in AddressPolicy().refusal(addr)


def test_policy_allows_public_and_configured_addresses():
    assert AddressPolicy().refusal("93.184.216.34") is None
    assert AddressPolicy().refusal("2606:2800:220:1:248:1893:25c8:1946") is None
    policy = AddressPolicy("127.0.0.1, 10.0.0.0/8")
    assert policy.refusal("127.0.0.1") is None and policy.refusal("10.9.9.9") is None
    assert "loopback" in policy.refusal("127.0.0.2") and "private" in policy.refusal("192.168.1.1")
    assert policy.resolve("127.0.0.1", 80) == ["127.0.0.1"]
    with pytest.raises(FetchRefused, match="169.254.169.254 is a link-local address"):
        AddressPolicy().resolve("169.254.169.254", 80)
    with pytest.raises(FetchRefused, match="localhost resolves to"):
        AddressPolicy().resolve("localhost", 80)
    with pytest.raises(FetchRefused):
        AddressPolicy("not-an-address")


def test_collection_options_are_checked():
    assert CollectionOptions.from_dict(None) == CollectionOptions()
    assert CollectionOptions.from_dict({"passage_words": 50, "overlap_words": 10, "index": "ivf"}).index == "ivf"
    for bad in ({"passage_words": 2}, {"overlap_words": 100}, {"index": "hnsw"}, {"colour": 1},
                {"passage_words": "50"}, [1]):
        with pytest.raises(InvalidInput):
            CollectionOptions.from_dict(bad)


def test_documents_are_checked_and_split():
    docs = parse_documents([{"id": 7, "text": "a b c", "metadata": {"k": 1}}, "plain text",
                            {"text": "x", "url": "http://e/"}], CollectionOptions())
    assert docs[0].id == "7" and docs[0].passages == ["a b c"] and docs[0].metadata == {"k": 1}
    assert len(docs[1].id) == 32 and docs[2].url == "http://e/"
    for bad in ([], "x", [{"text": ""}], [{"text": 5}], [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}],
                [{"text": "x", "metadata": []}], [{"text": "x", "extra": 1}], [{"text": "x", "id": 1.5}]):
        with pytest.raises(InvalidInput):
            parse_documents(bad, CollectionOptions())


def _unit(rng, n, d=16):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_flat_index_never_returns_filler_ids_and_honours_filters_and_removal():
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 5)
    idx = PassageIndex(16)
    idx.add(np.arange(10, 15), vecs)
    scores, ids = idx.search(vecs[2], 50)
    assert sorted(ids.tolist()) == [10, 11, 12, 13, 14] and ids[0] == 12
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and np.all(np.diff(scores) <= 1e-6)
    scores, ids = idx.search(vecs[2], 3, allowed=np.array([10, 14]))
    assert sorted(ids.tolist()) == [10, 14]
    idx.remove(np.array([12]))
    assert 12 not in idx.search(vecs[2], 10)[1].tolist() and idx.ntotal == 4
    assert len(idx.search(vecs[0], 3, allowed=np.array([], dtype=np.int64))[1]) == 0


def test_ivf_index_finds_exact_matches_and_agrees_with_flat():
    rng = np.random.default_rng(1)
    centres = _unit(rng, 20)
    vecs = centres[rng.integers(0, 20, 3000)] + 0.1 * rng.standard_normal((3000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cents = train_centroids(vecs, nlist_for(3000))
    ivf, flat = PassageIndex(16, cents, nprobe=8), PassageIndex(16)
    ids = np.arange(3000)
    ivf.add(ids, vecs)
    flat.add(ids, vecs)
    assert ivf.kind == "ivf" and ivf.nlist == cents.shape[0]
    hits = 0
    for q in range(0, 3000, 100):
        _, got = ivf.search(vecs[q], 10)
        _, want = flat.search(vecs[q], 10)
        assert got[0] == q
        hits += len(set(got.tolist()) & set(want.tolist()))
    assert hits / (30 * 10) >= 0.9
    _, got = ivf.search(vecs[5], 10, allowed=np.array([5, 6, 7]))
    assert sorted(got.tolist()) == [5, 6, 7]


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_layered_index_answers_as_one_index_of_the_same_passages(tmp_path, kind):
    """A written, memory-mapped snapshot plus a delta and hidden ids, against
    one PassageIndex of the live passages (same centroids, same nprobe)."""
    from retrieval.collections.snapshot_disk import write_snapshot
    from retrieval.collections.snapshot_files import FORMAT, SnapshotUnusable
    from retrieval.collections.snapshot_index import LayeredIndex, Snapshot

    rng = np.random.default_rng(3)
    vecs = _unit(rng, 4000)
    ids = np.arange(1, 4001) * 3  # sorted, with gaps, as passage ids are
    cents = train_centroids(vecs, 40) if kind == "ivf" else None
    snap_index = PassageIndex(16, cents, nprobe=4) if kind == "ivf" else None
    if snap_index is not None:
        snap_index.add(ids[:3000], vecs[:3000])
        faiss_index = snap_index.index
    else:
        import faiss

        faiss_index = faiss.IndexFlatIP(16)
        faiss_index.add(vecs[:3000])
    meta = {"format": FORMAT, "generation": 1, "cid": 7, "created": 1.5, "dim": 16, "seq": 3000, "kind": kind,
            "nlist": 0 if cents is None else len(cents), "ntotal": 3000, "trained_at": 3000}
    write_snapshot(tmp_path, 1, faiss_index, ids[:3000], meta)
    layered = LayeredIndex(Snapshot(tmp_path / "g000000000001", cid=7, dim=16, created=1.5), nprobe=4)
    layered.add(ids[3000:], vecs[3000:])  # the passages added since
    gone = np.concatenate([ids[:3000:7], ids[3000::11]])  # some of the snapshot's, some of the delta's
    layered.remove(gone)
    live = ~np.isin(ids, gone)
    ref = PassageIndex(16, cents, nprobe=4)
    ref.add(ids[live], vecs[live])
    assert layered.ntotal == ref.ntotal == int(live.sum())
    for q in _unit(rng, 15):
        for k, allowed in ((10, None), (500, None), (10, ids[::5]), (5, ids[:40]), (3, gone[:5])):
            got, want = layered.search(q, k, allowed), ref.search(q, k, allowed)
            assert got[1].tolist() == want[1].tolist()
            assert np.allclose(got[0], want[0], atol=1e-6)
    with pytest.raises(SnapshotUnusable, match="not a snapshot of collection 8"):
        Snapshot(tmp_path / "g000000000001", cid=8, dim=16, created=1.5)
    with pytest.raises(SnapshotUnusable, match="not a snapshot of collection 7"):  # same id, another collection
        Snapshot(tmp_path / "g000000000001", cid=7, dim=16, created=2.5)


def test_snapshot_settings_and_the_library_agree():
    from retrieval.collections.snapshot_manager import DELTA_MAX, STALE_HOST_S
    from shm_protocol.config import Settings

    assert (Settings().snapshot_delta, Settings().snapshot_stale_host_s) == (DELTA_MAX, STALE_HOST_S)


def _defined(scores, ids) -> bool:
    """Best first, and equal scores in ascending id order."""
    pairs = list(zip(scores.tolist(), ids.tolist()))
    return all(a[0] > b[0] or (a[0] == b[0] and a[1] < b[1]) for a, b in zip(pairs, pairs[1:]))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_equal_scores_come_back_in_id_order_and_the_cut_keeps_the_smallest_ids(tmp_path, kind):
    """Passages of exactly equal score (the same vector), added with the later ids first,
    some in a snapshot and some in its delta: the answer lists them by id, and a cut
    of top_k inside them keeps the smallest ids, in a plain index and a layered one."""
    import faiss

    from retrieval.collections.snapshot_disk import write_snapshot
    from retrieval.collections.snapshot_files import FORMAT
    from retrieval.collections.snapshot_index import LayeredIndex, Snapshot

    rng = np.random.default_rng(21)
    filler = _unit(rng, 600)
    tie = _unit(rng, 1)[0]
    tied = np.arange(140, 100, -2)  # 20 ids, the larger added first
    cents = train_centroids(np.vstack([filler, tie[None]]), 8) if kind == "ivf" else None
    ref = PassageIndex(16, cents, nprobe=8)
    ref.add(np.arange(1000, 1600), filler)
    ref.add(tied, np.repeat(tie[None], len(tied), 0))
    base_ids = np.concatenate([tied[:10][::-1], np.arange(1000, 1600)])  # a snapshot's ids are sorted
    base_vecs = np.vstack([np.repeat(tie[None], 10, 0), filler])
    if kind == "ivf":
        holder = PassageIndex(16, cents, nprobe=8)
        holder.add(base_ids, base_vecs)
        snap_index = holder.index
    else:
        snap_index = faiss.IndexFlatIP(16)
        snap_index.add(base_vecs)
    meta = {"format": FORMAT, "generation": 1, "cid": 7, "created": 1.5, "dim": 16, "seq": 1, "kind": kind,
            "nlist": 0 if cents is None else len(cents), "ntotal": len(base_ids), "trained_at": 610}
    write_snapshot(tmp_path, 1, snap_index, base_ids, meta)
    layered = LayeredIndex(Snapshot(tmp_path / "g000000000001", cid=7, dim=16, created=1.5), nprobe=8)
    layered.add(tied[10:], np.repeat(tie[None], 10, 0))  # the smaller ids, in the delta
    want = np.sort(tied)
    for index in (ref, layered):
        for k in (1, 3, 10, 11, 20):
            scores, ids = index.search(tie, k)
            assert ids.tolist() == want[:k].tolist() and _defined(scores, ids)
        scores, ids = index.search(tie, 30)
        assert ids[:20].tolist() == want.tolist() and _defined(scores, ids)
        allowed = np.concatenate([tied[::3], np.arange(1000, 1100)])
        scores, ids = index.search(tie, 4, allowed)
        assert ids.tolist() == np.sort(tied[::3])[:4].tolist()
        for q in _unit(rng, 5):
            assert _defined(*index.search(q, 50))


def test_the_in_memory_index_lists_equal_scores_in_document_order():
    from compat.index import build_vector_index, search_index
    from tests.helpers import FixedVectorClient

    texts = ["b", "same", "c", "same", "same", "d", "same"]
    built = build_vector_index(texts, client=FixedVectorClient())
    got = search_index("same", built, top_k=3)
    assert [r["id"] for r in got] == [1, 3, 4] and [r["rank"] for r in got] == [1, 2, 3]
    assert len({r["score"] for r in got}) == 1
    assert [r["id"] for r in search_index("same", built, top_k=5)][:4] == [1, 3, 4, 6]
