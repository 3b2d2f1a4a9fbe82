"""Several models in one sidecar, reranking with a cross-encoder, and their
HTTP forms, against real models: the bundled MiniLM, a tiny randomly
initialised BERT and a cross-encoder made from the bundled weights with a
fresh one-label head. Vectors are compared with SentenceTransformer.encode
and scores with CrossEncoder.predict, over the same rings, under concurrent
load and against hostile slot writes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from shm_protocol.errors import InvalidInput, ModelNotFound, RequestTooLarge, SlotRejected
from shm_protocol.layout import SLOT_READY, SlotError
from tests.helpers import (
    REPO,
    client_for,
    cosine_rows,
    linked_model_folder,
    start_sidecar,
    start_web,
    stop_and_check,
    synthetic_reference,
)

TEXTS = ["how do shared-memory rings work", "Semaphores wake the waiting worker.", "a", "ünïcödé text",
         "The quick brown fox jumps over the lazy dog. " * 3]
QUERY = "what wakes a waiting worker"
DOCS = ["Semaphores wake the waiting worker.", "Paris is the capital of France.", "",
        "A worker blocks on its slot's semaphore until the sidecar posts it. " * 60,  # over 512 tokens: cut
        "ünïcödé"]


@pytest.fixture(scope="module")
def prompted_ce(cross_encoder_path, tmp_path_factory):
    """The test's cross-encoder (linked) with a default prompt in its config."""
    return linked_model_folder(cross_encoder_path, tmp_path_factory.mktemp("ce-prompted") / "ce-prompted",
                               prompts={"query": "Find what answers: ", "short": "q: "}, default_prompt_name="query")


@pytest.fixture(scope="module")
def models_env(real_model_path, tiny_model, cross_encoder_path, prompted_ce):
    return {"SHM_EMBED_MODELS": f"minilm={real_model_path},tiny={tiny_model};matryoshka,ce={cross_encoder_path},"
                                f"ce-prompted={prompted_ce}",
            "SHM_EMBED_TORCH_THREADS": "1"}


@pytest.fixture(scope="module")
def multi(models_env, tmp_path_factory):
    sc = start_sidecar(tmp_path_factory.mktemp("sc-multi"), None, **models_env)
    yield sc
    stop_and_check(sc)


def _ce_pairs(query, docs):
    return [(query, d) for d in docs]


def test_the_header_lists_every_model_and_a_call_picks_one_by_name(multi, real_model, tiny_st):
    with client_for(multi) as client:
        cards = client.models()
        assert [(m["name"], m["kind"], m["dimension"]) for m in cards] == [
            ("minilm", "embed", 384), ("tiny", "embed", 32), ("ce", "rerank", 1), ("ce-prompted", "rerank", 1)]
        assert client.info()["model"] == "minilm" and client.dimension == 384
        assert cosine_rows(client.embed(TEXTS), real_model.encode(TEXTS)).min() >= 0.99999
        tiny = client.embed(TEXTS, model="tiny")
        assert tiny.shape == (len(TEXTS), 32)
        assert cosine_rows(tiny, tiny_st.encode(TEXTS)).min() >= 0.99999
        assert client.embed_detailed(TEXTS[:1], model="tiny").model == "tiny"
        assert cosine_rows(client.embed(TEXTS, model="org/minilm"), real_model.encode(TEXTS)).min() >= 0.99999
        for call, kw in ((client.embed, {"model": "nope"}), (client.embed, {"model": "ce"})):
            with pytest.raises(ModelNotFound):
                call(TEXTS, **kw)
        with pytest.raises(ModelNotFound):
            client.rerank(QUERY, DOCS, model="minilm")  # an embedding model does not rerank
        # ";matryoshka" in SHM_EMBED_MODELS marks one model only
        assert [m["matryoshka"] for m in cards] == [False, True, False, False]
        cut = client.embed(TEXTS, model="tiny", dimensions=16, normalize=True)
        want = tiny_st.encode(TEXTS, truncate_dim=16, normalize_embeddings=True)
        assert cut.shape == (len(TEXTS), 16) and cosine_rows(cut, want).min() >= 0.99999
        with pytest.raises(InvalidInput, match="Matryoshka"):
            client.embed(TEXTS, dimensions=128)


def test_rerank_scores_equal_cross_encoder_predict(multi, cross_encoder):
    import torch

    pairs = _ce_pairs(QUERY, DOCS)
    want = cross_encoder.predict(pairs)
    want_raw = cross_encoder.predict(pairs, activation_fn=torch.nn.Identity())
    with client_for(multi) as client:
        got = client.rerank(QUERY, DOCS)
        assert got.dtype == np.float32 and got.shape == (len(DOCS),)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(client.rerank(QUERY, DOCS, raw_scores=True), want_raw, atol=1e-5, rtol=0)
        # one pair alone (the sidecar's one-text path) and many (batched)
        np.testing.assert_allclose(client.rerank(QUERY, DOCS[:1], model="ce"), want[:1], atol=1e-5, rtol=0)
        many = [f"document number {i} about workers and semaphores" for i in range(150)]
        np.testing.assert_allclose(client.rerank(QUERY, many), cross_encoder.predict(_ce_pairs(QUERY, many)),
                                   atol=1e-5, rtol=0)
        # a query over the model's limit: cut once, the same pairs as predict's
        long_query = "why does the waiting worker wake " * 200
        np.testing.assert_allclose(client.rerank(long_query, DOCS), cross_encoder.predict(_ce_pairs(long_query, DOCS)),
                                   atol=1e-5, rtol=0)
        with pytest.raises(RequestTooLarge, match="the query alone"):
            client.rerank(long_query, DOCS, truncate=False)
        # both sides long, the query longer or shorter: cut on both sides as predict cuts them
        long_docs = ["semaphores post the slot " * 150, "a worker waits " * 400, DOCS[1]]
        for q in (long_query, "why does the waiting worker wake " * 60):
            np.testing.assert_allclose(client.rerank(q, long_docs), cross_encoder.predict(_ce_pairs(q, long_docs)),
                                       atol=1e-5, rtol=0)
        res = client.rerank_detailed(QUERY, DOCS)
        assert res.model == "ce" and res.token_counts.max() == 512  # the long pair was cut at the model's limit
        with pytest.raises(RequestTooLarge):
            client.rerank(QUERY, DOCS, truncate=False)
        assert client.rerank(QUERY, []).shape == (0,)


def test_models_under_concurrent_load_never_cross_talk(multi, real_model, tiny_st, cross_encoder):
    """Threads of two clients (two rings) send random requests to all three
    models at once; every answer is checked against its own reference."""
    pool = [f"sentence {i}: {'alpha beta gamma delta'.split()[i % 4]} {i * 7919 % 1000}" for i in range(40)]
    ref = {"minilm": real_model.encode(pool), "tiny": tiny_st.encode(pool),
           "ce": cross_encoder.predict(_ce_pairs(QUERY, pool))}
    wrong, done, errors = [], [0], []
    lock = threading.Lock()

    def run(client, seed):
        rng = random.Random(seed)
        try:
            for _ in range(25):
                idx = rng.sample(range(len(pool)), rng.randint(1, 6))
                texts = [pool[i] for i in idx]
                model = rng.choice(["minilm", "tiny", "ce"])
                if model == "ce":
                    ok = np.abs(client.rerank(QUERY, texts, model="ce") - ref["ce"][idx]).max() <= 1e-5
                else:
                    ok = cosine_rows(client.embed(texts, model=model), ref[model][idx]).min() >= 0.99999
                with lock:
                    done[0] += 1
                    if not ok:
                        wrong.append((model, idx))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with client_for(multi) as c1, client_for(multi) as c2:
        before = {m["name"]: m for m in c1.stats().models}
        threads = [threading.Thread(target=run, args=(c, i)) for i, c in enumerate([c1, c2, c1, c2, c1, c2])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors[:3]
        assert done[0] == 150 and wrong == []
        after = {m["name"]: m for m in c1.stats().models}
    for name in ("minilm", "tiny", "ce"):
        assert after[name]["requests"] > before[name]["requests"], name
        assert after[name]["batches"] > before[name]["batches"], name
        assert after[name]["errors"] == before[name]["errors"], name


def _submit_raw(sess, *, model: int, ids, offsets, segments=None):
    slot = sess.take_slot(1)
    views = sess.slot_views
    views.tokens[slot, : len(ids)] = ids
    views.offsets[slot, : len(offsets)] = offsets
    views.segments[slot, :] = 0
    if segments is not None:
        views.segments[slot, : len(segments)] = segments
    views.model[slot] = model
    views.n_texts[slot] = len(offsets) - 1
    views.n_tokens[slot] = len(ids)
    seq = 777_000 + slot
    views.seq[slot] = seq
    views.state[slot] = SLOT_READY
    sess.bell.post()
    return slot, seq


@pytest.mark.parametrize("model, segments, code", [
    (7, None, SlotError.BAD_MODEL),  # no such model
    (0, [2], SlotError.BAD_SEGMENTS),  # pairs for an embedding model
    (2, [9], SlotError.BAD_SEGMENTS),  # a split beyond the text
    (1, None, SlotError.BAD_TOKEN),  # within the layout's vocabulary, checked against the model's own
])
def test_hostile_model_indexes_and_segments_are_refused_and_serving_goes_on(multi, real_model, model, segments,
                                                                            code):
    with client_for(multi) as client:
        sess = client._get_session()
        ids = [101, 7592, 102] if code != SlotError.BAD_TOKEN else [101, 2 ** 20, 102]
        s, seq = _submit_raw(sess, model=model, ids=ids, offsets=[0, 3], segments=segments)
        with pytest.raises(SlotRejected) as err:
            sess._collect(s, seq, np.empty((1, sess.params.dim), np.float32))
        assert err.value.code == code
        assert cosine_rows(client.embed(TEXTS[:2]), real_model.encode(TEXTS[:2])).min() >= 0.99999


@pytest.fixture(scope="module")
def multi_web(multi, models_env, tmp_path_factory):
    web = start_web(tmp_path_factory.mktemp("web-multi"), {**multi.env, **models_env}, workers=1,
                    SHM_EMBED_FETCH_ALLOW="127.0.0.1")
    yield web
    web.stop()


def test_http_serves_every_model_and_reranks_in_both_shapes(multi, multi_web, real_model, tiny_st, cross_encoder):
    web = multi_web
    with httpx.Client(base_url=web.base, timeout=60) as http_client:
        cards = http_client.get("/v1/models").json()["data"]
        assert [(m["id"], m["kind"]) for m in cards] == [("minilm", "embed"), ("tiny", "embed"),
                                                         ("ce", "rerank"), ("ce-prompted", "rerank")]
        assert http_client.get("/v1/models/ce").json()["dimension"] == 1
        r = http_client.post("/v1/embeddings", json={"input": TEXTS, "model": "tiny"}).json()
        assert r["model"] == "tiny"
        got = np.array([d["embedding"] for d in r["data"]])
        assert cosine_rows(got, tiny_st.encode(TEXTS)).min() >= 0.99999
        got = np.array(http_client.post("/embed", json={"inputs": TEXTS}).json())  # the default model
        assert cosine_rows(got, real_model.encode(TEXTS)).min() >= 0.99999
        nf = http_client.post("/v1/embeddings", json={"input": "x", "model": "ce"})
        assert nf.status_code == 404 and nf.json()["error"]["code"] == "model_not_found"

        want = cross_encoder.predict(_ce_pairs(QUERY, DOCS))
        order = list(np.argsort(-want, kind="stable"))
        tei = http_client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}).json()
        assert [x["index"] for x in tei] == order
        assert np.abs(np.array([x["score"] for x in tei]) - want[order]).max() <= 1e-5
        assert tei[0]["text"] == DOCS[order[0]]
        co = http_client.post("/v1/rerank", json={"model": "ce", "query": QUERY, "documents": DOCS, "top_n": 3}).json()
        assert [x["index"] for x in co["results"]] == order[:3] and co["model"] == "ce"
        assert np.abs(np.array([x["relevance_score"] for x in co["results"]]) - want[order[:3]]).max() <= 1e-5
        bad = http_client.post("/v1/rerank", json={"model": "minilm", "query": QUERY, "documents": DOCS})
        assert bad.status_code == 404

        info = http_client.get("/info").json()
        assert [m["name"] for m in info["models"]] == ["minilm", "tiny", "ce", "ce-prompted"]
        metrics = http_client.get("/metrics").text
        assert 'shm_embed_model_requests_total{model="ce"}' in metrics
        assert 'shm_embed_model_info{dimension="32",kind="embed",max_tokens="256",model="tiny"}' in metrics
        stats = http_client.get("/embedding/stats").json()
        per = {m["name"]: m for m in stats["models"]}
        assert per["ce"]["texts"] >= len(DOCS) and per["tiny"]["texts"] >= len(TEXTS)
    cli = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli", "--json"], env=multi.env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert [m["name"] for m in json.loads(cli.stdout)["models"]] == ["minilm", "tiny", "ce", "ce-prompted"]
    human = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli"], env=multi.env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert "models" in human.stdout and "rerank" in human.stdout


def test_collections_use_their_model_and_prompts_and_searches_rerank(multi_web, tiny_st, cross_encoder):
    passages = ["Semaphores wake the waiting worker.", "Paris is the capital of France.",
                "The sidecar batches slots from every worker.", "Bananas are a yellow fruit."]
    opts = {"model": "tiny", "query_prompt": "query: ", "document_prompt": "passage: "}
    with httpx.Client(base_url=multi_web.base, timeout=60) as http_client:
        made = http_client.put("/collections/prompted", json={"options": opts})
        assert made.status_code == 201, made.text
        assert made.json()["model"] == "tiny" and made.json()["dimension"] == 32
        assert http_client.put("/collections/prompted", json={"options": opts}).status_code == 200  # the same again
        changed = {"options": {**opts, "query_prompt": "q: "}}
        assert http_client.put("/collections/prompted", json=changed).status_code == 409
        assert http_client.put("/collections/wrong", json={"options": {"model": "ce"}}).status_code == 404
        docs = [{"id": str(i), "text": t} for i, t in enumerate(passages)]
        up = http_client.post("/collections/prompted/documents", json={"documents": docs})
        assert up.status_code == 200, up.text
        query = "what wakes a worker"
        res = http_client.post("/collections/prompted/search", json={"query": query, "top_k": 4}).json()["results"]
        q = tiny_st.encode([query], prompt="query: ", normalize_embeddings=True)[0]
        d = tiny_st.encode(passages, prompt="passage: ", normalize_embeddings=True)
        want = {str(i): float(d[i] @ q) for i in range(len(passages))}
        assert len(res) == 4
        for result in res:
            assert result["score"] == pytest.approx(want[result["id"]], abs=1e-4)
        reranked = http_client.post(
            "/collections/prompted/search",
            json={"query": query, "top_k": 4, "rerank": {"model": "ce", "top_n": 2}}).json()["results"]
        scores = cross_encoder.predict([(query, p) for p in passages])
        best = [str(i) for i in np.argsort(-scores, kind="stable")[:2]]
        assert [r["id"] for r in reranked] == best
        for result in reranked:
            assert result["rerank_score"] == pytest.approx(float(scores[int(result["id"])]), abs=1e-5)
            assert result["score"] == pytest.approx(want[result["id"]], abs=1e-4)
        for bad in ({"model": 3}, {"top_n": 0}, {"other": 1}, "yes"):
            result = http_client.post("/collections/prompted/search", json={"query": query, "rerank": bad})
            assert result.status_code == 422, bad
        result = http_client.post("/collections/prompted/search", json={"query": query, "rerank": {"model": "tiny"}})
        assert result.status_code == 404 and result.json()["error"]["code"] == "model_not_found"


def test_web_search_reranks_its_passages(multi_web, cross_encoder):
    from http.server import ThreadingHTTPServer

    from tests.integration.test_web_retrieval import TOPICS, Pages

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{server.server_port}/pages/{t}" for t in TOPICS]
        query = "how do whales migrate"
        with httpx.Client(base_url=multi_web.base, timeout=60) as h:
            plain = h.post("/search/web", json={"query": query, "urls": urls, "top_k": 6}).json()["results"]
            r = h.post("/search/web", json={"query": query, "urls": urls, "top_k": 6, "rerank": {"top_n": 3}})
            assert r.status_code == 200, r.text
            got = r.json()["results"]
    finally:
        server.shutdown()
    assert len(got) == 3 and {g["passage"] for g in got} <= {p["passage"] for p in plain}
    want = cross_encoder.predict([(query, p["passage"]) for p in plain])
    best = sorted(zip(want.tolist(), [p["passage"] for p in plain]), key=lambda x: -x[0])[:3]
    assert [g["passage"] for g in got] == [b[1] for b in best]
    for g, (score, _) in zip(got, best):
        assert g["rerank_score"] == pytest.approx(score, abs=1e-5)


def test_a_cross_encoders_prompts_go_before_the_query_as_predict_puts_them(multi, prompted_ce):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(prompted_ce), device="cpu")
    pairs = _ce_pairs(QUERY, DOCS)
    with client_for(multi) as client:
        np.testing.assert_allclose(client.rerank(QUERY, DOCS, model="ce-prompted"), ce.predict(pairs),
                                   atol=1e-5, rtol=0)  # the default prompt
        np.testing.assert_allclose(client.rerank(QUERY, DOCS, model="ce-prompted", prompt_name="short"),
                                   ce.predict(pairs, prompt_name="short"), atol=1e-5, rtol=0)
        np.testing.assert_allclose(client.rerank(QUERY, DOCS, model="ce-prompted", prompt=""),
                                   ce.predict(pairs, prompt=""), atol=1e-5, rtol=0)


def test_a_reranker_listed_first_is_not_the_default_and_a_tampered_table_is_refused(tiny_model,
                                                                                    cross_encoder_path, tmp_path):
    from shm_protocol.errors import LayoutMismatch
    from shm_protocol.region import Region

    sc = start_sidecar(tmp_path, None, SHM_EMBED_SYNTHETIC_US="0",
                       SHM_EMBED_MODELS=f"ce={cross_encoder_path},tiny={tiny_model}")
    try:
        with client_for(sc) as c:
            info = c.info()
            assert (info["model"], info["dimension"]) == ("tiny", 384) and c.dimension == 384
            assert c.embed(["x"]).shape == (1, 384) and c.rerank("q", ["d"]).shape == (1,)
        region = Region.attach(sc.names)
        try:
            region.header["models"][1]["dim"] = 100_000  # wider than any slot
        finally:
            region.close()
        with pytest.raises(LayoutMismatch):
            client_for(sc)
        web = start_web(tmp_path, sc.env, workers=1)
        try:
            r = httpx.post(web.base + "/v1/embeddings", json={"input": "x", "model": "tiny"}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        finally:
            web.stop()
    finally:
        stop_and_check(sc)


def _set_model_field(sc, index: int, field: str, value: int) -> int:
    """Write one field of the sidecar's model table in place, as a process
    with write access to the control segment can; returns the old value."""
    from shm_protocol.region import Region

    region = Region.attach(sc.names, with_data=False)
    try:
        old = int(region.header["models"][index][field])
        region.header["models"][index][field] = value
        return old
    finally:
        region.close()


def test_a_table_tampered_within_the_layout_is_refused_and_a_live_client_keeps_its_copy(
        tiny_model, cross_encoder_path, real_model_path, tmp_path):
    """Model table entries changed in the control segment to values that
    still fit the slots: a dimension of 100 for a 384-wide model, a
    cross-encoder marked as an embedding model. A new client refuses the
    table (LayoutMismatch, 503 over HTTP); a client attached before keeps its
    checked copy and its shapes; and where a change cannot be told from the
    files (two embedding models of the synthetic backend, one narrowed), the
    request fails rather than returning vectors cut short."""
    from shm_protocol.errors import LayoutMismatch
    from shm_protocol.layout import ModelKind

    sc = start_sidecar(tmp_path, None, SHM_EMBED_SYNTHETIC_US="0",
                       SHM_EMBED_MODELS=f"ce={cross_encoder_path},tiny={tiny_model},mini={real_model_path}")
    try:
        live = client_for(sc)
        want = ["a live client's text"]
        ref = synthetic_reference(live, want)
        narrow = [(1, "dim", 100), (2, "dim", 100)]  # both 384-wide models: the slots' width is unused
        for changes in (narrow, [(0, "kind", int(ModelKind.EMBED))]):
            olds = [(index, field, _set_model_field(sc, index, field, value)) for index, field, value in changes]
            with pytest.raises(LayoutMismatch):
                client_for(sc)
            web = start_web(tmp_path, sc.env, workers=1)
            try:
                r = httpx.post(web.base + "/v1/embeddings", json={"input": "x", "model": "tiny"}, timeout=30)
                assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
            finally:
                web.stop()
            got = live.embed(want, model="tiny")
            assert got.shape == (1, 384) and np.allclose(got, ref, atol=1e-6)
            assert live.rerank("q", ["d"]).shape == (1,)
            for index, field, value in olds:
                _set_model_field(sc, index, field, value)
        # Two embedding models of the synthetic backend: the files cannot
        # tell their size, and the other keeps the largest dimension.
        _set_model_field(sc, 2, "dim", 100)
        with client_for(sc) as narrowed:
            with pytest.raises(LayoutMismatch):
                narrowed.embed(want, model="mini")
            assert narrowed.embed(want, model="tiny").shape == (1, 384)
        assert live.embed(want, model="mini").shape == (1, 384)
        live.close()
    finally:
        stop_and_check(sc)


def test_http_rerank_applies_prompts_and_refuses_broken_text(multi_web, prompted_ce):
    """A cross-encoder's prompt_name over HTTP gives predict's scores with
    that prompt; an unknown one is a 422. Half a character in the query (which
    was tokenized outside the guarded path), in a document after a long query,
    or in the model's name is a 422 naming the field, never a 500."""
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(prompted_ce), device="cpu")
    pairs = _ce_pairs(QUERY, DOCS[:3])
    with httpx.Client(base_url=multi_web.base, timeout=60) as http_client:
        def scores(path, **extra):
            field = "texts" if path == "/rerank" else "documents"
            response = http_client.post(path, json={"model": "ce-prompted", "query": QUERY, field: DOCS[:3], **extra})
            assert response.status_code == 200, response.text
            rows = response.json() if path == "/rerank" else response.json()["results"]
            key = "score" if path == "/rerank" else "relevance_score"
            return np.array([x[key] for x in sorted(rows, key=lambda x: x["index"])])

        for path in ("/rerank", "/v1/rerank"):
            short = scores(path, prompt_name="short")
            np.testing.assert_allclose(short, ce.predict(pairs, prompt_name="short"), atol=1e-5, rtol=0)
            assert np.abs(short - scores(path)).max() > 1e-4  # the default prompt gives other scores
            np.testing.assert_allclose(scores(path, prompt="q: "), short, atol=1e-6, rtol=0)
            response = http_client.post(path, json={"model": "ce-prompted", "query": QUERY, "texts": DOCS,
                                                    "documents": DOCS,
                                                    "prompt_name": "nope"})
            assert response.status_code == 422 and "nope" in response.json()["error"]["message"], response.text

        long_query = "what wakes a worker " * 200
        for path, body, where in (
                ("/rerank", {"query": "half \ud83d", "texts": DOCS}, "'query'"),
                ("/rerank", {"query": long_query, "texts": ["ok", "x\udc00"]}, "'texts[1]'"),
                ("/rerank", {"query": QUERY, "texts": DOCS, "model": "ce\ud83d"}, "'model'"),
                ("/v1/rerank", {"query": QUERY, "documents": [{"text": "\ud83d"}], "model": "ce"},
                 "'documents[0].text'"),
                ("/v1/embeddings", {"input": "x", "model": "\ud83d"}, "'model'"),
                ("/search/web", {"query": "q", "urls": ["http://127.0.0.1/\ud83d"]}, "'urls[0]'")):
            response = http_client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            assert response.status_code == 422 and where in response.json()["error"]["message"], (path, response.text)
        assert http_client.post("/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200


def test_tokenize_and_decode_serve_a_reranker_too(multi):
    with client_for(multi) as c:
        [one] = c.tokenize(["a b"], model="ce-prompted", prompt_name="short")
        assert one.text == "q: a b" and c.decode([one.ids], model="ce") == ["q : a b"]
        with pytest.raises(ModelNotFound):
            c.tokenize(["a"], model="nope")
