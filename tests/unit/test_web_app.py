"""The HTTP contract, in process: the Falcon app built around a fake client
(no sidecar, no shared memory), every route and every error status, as
Falcon's own tutorial tests its app. The real processes are the integration
tests' business; this file runs in about a second."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import sqlite3

import numpy as np
import pytest
from falcon import testing

from shm_protocol.classify import ClassifyResult, activate_labels, check_inputs
from shm_protocol.client import EmbeddingBackend, EmbedResult, RerankResult
from shm_protocol.config import COLLECTIONS_DB, Settings
from shm_protocol.errors import (
    InvalidInput,
    LayoutMismatch,
    ModelFailed,
    ModelNotFound,
    NoRingAvailable,
    RequestTooLarge,
    RingFull,
    SidecarTimeout,
    SidecarUnavailable,
)
from shm_protocol.layout import Activation
from shm_protocol.model_files import TextOptions, bundled_model_path, name_matches, tokenizer_file
from shm_protocol.stats import Snapshot
from shm_protocol.tokenizer import WorkerTokenizer, check_token_budget
from shm_protocol.tokens import decode_ids, tokenize_texts
from web.app import create_app

DIM = 8
#: The fake reranker's prompts (none by default).
RERANK_PROMPTS = TextOptions(prompts={"short": "q: "})
#: The fake embedding model's prompts, for Cohere's input_type.
EMBED_PROMPTS = TextOptions(prompts={"query": "query: ", "passage": "passage: "})
#: The fake classifier's labels.
FAKE_LABELS = ("calm", "busy", "down")
_tokenizers: list[WorkerTokenizer] = []


def bundled_tokenizer() -> WorkerTokenizer:
    """The bundled model's tokenizer (the fake's tokens are real ones), at the fake's limit of 16."""
    if not _tokenizers:
        _tokenizers.append(WorkerTokenizer(str(tokenizer_file(bundled_model_path())), 16))
    return _tokenizers[0]


def fake_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32) * 3


class FakeClient:
    """An EmbeddingBackend with known vectors (one per text) and a switch
    that makes every call raise a given error."""

    def __init__(self):
        self.fail: Exception | None = None
        self.calls: list[dict] = []

    def _check(self):
        if self.fail is not None:
            raise self.fail

    def _model(self, model):
        if model is not None and not name_matches(model, "fake-model"):
            raise ModelNotFound(f"The model '{model}' does not exist here; this service serves 'fake-model'",
                                requested=model, served=["fake-model"])

    def embed_detailed(self, texts, *, truncate=None, normalize=False, max_tokens=None, prompt=None,
                       prompt_name=None, dimensions=None, model=None, truncation_direction=None,
                       chunk=None) -> EmbedResult:
        self._check()
        self._model(model)
        self.calls.append({"texts": list(texts), "truncate": truncate, "normalize": normalize, "prompt": prompt,
                           "prompt_name": prompt_name, "dimensions": dimensions,
                           **({"truncation_direction": truncation_direction} if truncation_direction else {}),
                           **({"chunk": chunk} if chunk is not None else {})})
        TextOptions().check_dimensions(dimensions, DIM, "fake-model")  # as the real clients check it
        vecs = np.stack([fake_vector(t) for t in texts]) if texts else np.empty((0, DIM), np.float32)
        if normalize:
            vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        counts = np.array([len(t.split()) + 2 for t in texts], dtype=np.int64)
        check_token_budget(counts, max_tokens)
        return EmbedResult(vecs.astype(np.float32), counts, 1000, 2000, 1, 0, "fake-model")

    def rerank_detailed(self, query, documents, *, model=None, raw_scores=False, truncate=True, max_tokens=None,
                        prompt=None, prompt_name=None):
        """Scores: the cosine of the fake vectors (raw), through a sigmoid unless raw_scores;
        the reranker's prompt before the query, as the real client puts it."""
        self._check()
        if model is not None and not name_matches(model, "fake-reranker"):
            raise ModelNotFound(f"The model '{model}' does not exist here", requested=model,
                                served=["fake-model", "fake-reranker"])
        query = (RERANK_PROMPTS.resolve_prompt(prompt, prompt_name) or "") + query
        q = fake_vector(query)
        raw = np.array([float(fake_vector(d) @ q / np.linalg.norm(fake_vector(d)) / np.linalg.norm(q))
                        for d in documents], np.float32)
        counts = np.array([len(query.split()) + len(d.split()) + 3 for d in documents], dtype=np.int64)
        check_token_budget(counts, max_tokens)
        scores = raw if raw_scores else (1 / (1 + np.exp(-raw))).astype(np.float32)
        return RerankResult(scores, counts, "fake-reranker", 0, 0)

    def classify_detailed(self, inputs, *, model=None, raw_scores=False, truncate=True, max_tokens=None):
        """Logits: the first fake vector components of each text (a pair's texts
        joined by a tab), through a softmax unless raw_scores."""
        self._check()
        inputs = check_inputs(inputs)
        if model is not None and not name_matches(model, "fake-classifier"):
            raise ModelNotFound(f"The model '{model}' does not exist here", requested=model,
                                served=["fake-model", "fake-reranker", "fake-classifier"])
        texts = [item if isinstance(item, str) else "\t".join(item) for item in inputs]
        raw = np.array([fake_vector(t)[: len(FAKE_LABELS)] for t in texts], np.float32).reshape(-1, len(FAKE_LABELS))
        counts = np.array([len(t.split()) + 2 for t in texts], dtype=np.int64)
        check_token_budget(counts, max_tokens)
        self.calls.append({"inputs": inputs, "truncate": truncate})
        scores = raw if raw_scores else activate_labels(raw, Activation.SOFTMAX)
        return ClassifyResult(scores, FAKE_LABELS, counts, "fake-classifier", 0, 0)

    def classify(self, inputs, *, model=None, raw_scores=False, truncate=True):
        return self.classify_detailed(inputs, model=model, raw_scores=raw_scores, truncate=truncate).ranked()

    def embed(self, texts, *, truncate=None, normalize=False, prompt=None, prompt_name=None, dimensions=None,
              model=None, **options):
        return self.embed_detailed(texts, truncate=truncate, normalize=normalize, prompt=prompt,
                                   prompt_name=prompt_name, dimensions=dimensions, model=model, **options).vectors

    def prompts(self, model=None) -> dict:
        self._check()
        self._model(model)
        return dict(EMBED_PROMPTS.prompts)

    def tokenize(self, texts, *, model=None, add_special_tokens=True, prompt=None, prompt_name=None,
                 max_tokens=None):
        self._check()
        self._model(model)
        return tokenize_texts(bundled_tokenizer(), texts, prompt=EMBED_PROMPTS.resolve_prompt(prompt, prompt_name),
                              add_special_tokens=add_special_tokens, max_tokens=max_tokens)

    def decode(self, ids, *, model=None, skip_special_tokens=True):
        self._check()
        self._model(model)
        return decode_ids(bundled_tokenizer(), ids, vocab_size=bundled_tokenizer().vocab_size,
                          skip_special_tokens=skip_special_tokens)

    def info(self) -> dict:
        self._check()
        return {"model": "fake-model", "dimension": DIM, "max_seq_length": 16, "device": "fake",
                "models": [{"name": "fake-model", "kind": "embed", "dimension": DIM, "max_seq_length": 16},
                           {"name": "fake-reranker", "kind": "rerank", "dimension": 1, "max_seq_length": 16},
                           {"name": "fake-classifier", "kind": "classify", "dimension": len(FAKE_LABELS),
                            "max_seq_length": 16}]}

    def stats(self) -> Snapshot:
        self._check()
        return Snapshot(
            namespace="fake", model="fake-model", device="fake", dtype="float32", dim=DIM,
            max_seq_length=16, sidecar_pid=1,
            sidecar_alive=True, state="ready", epoch="00", uptime_s=1.0, heartbeat_age_s=0.01, loop_age_s=0.01,
            unavailable=None,
            counters={k: 0 for k in ("requests", "texts", "tokens", "padded_tokens", "batches", "rings_reaped",
                                     "loop_errors", "stale_answers")},
            errors={}, batch_texts_hist=[0] * 12, queue_hist=[0] * 17, compute_hist=[0] * 17, queue_ns_sum=0,
            compute_ns_sum=0, queue_depth=0, busy_slots=0, rings=[])

    def close(self) -> None:
        pass


@pytest.fixture
def fake():
    return FakeClient()


@pytest.fixture
def app(fake, tmp_path):
    settings = Settings.from_env({}, data_dir=str(tmp_path / "data"), max_inputs=5, max_input_chars=50,
                                 max_body_bytes=4096)
    return testing.TestClient(create_app(fake, settings))


def protocol_methods(protocol) -> list[str]:
    return sorted(name for name, value in vars(protocol).items() if inspect.isfunction(value)
                  and not name.startswith("_"))


def test_the_fake_and_the_real_clients_are_embedding_backends(fake, tmp_path):
    """Each client has every method of the protocol with the same parameters:
    names, kinds (positional, keyword-only) and defaults, in order."""
    from compat.fallback import FallbackClient
    from shm_protocol.client import EmbeddingClient

    assert {"embed_detailed", "rerank_detailed", "classify_detailed", "classify", "info", "stats",
            "close"} <= set(protocol_methods(EmbeddingBackend))
    settings = Settings.from_env({}, data_dir=str(tmp_path))
    for client in (fake, EmbeddingClient(settings), FallbackClient(settings.replace(use_ipc=False))):
        assert isinstance(client, EmbeddingBackend), type(client).__name__
        for name in protocol_methods(EmbeddingBackend):
            want = inspect.signature(getattr(EmbeddingBackend, name)).parameters.values()
            got = inspect.signature(getattr(type(client), name)).parameters.values()
            # A parameter's name may differ only where it is positional (self, texts).
            key = lambda p: (p.name if p.kind != p.POSITIONAL_OR_KEYWORD else "", p.kind, p.default)  # noqa: E731
            assert [key(p) for p in got] == [key(p) for p in want], (type(client).__name__, name)


def test_embed_returns_normalized_vectors_in_order(app, fake):
    response = app.simulate_post("/embed", json={"inputs": ["a b", "c"]})
    assert response.status_code == 200
    got = np.asarray(response.json, np.float32)
    want = np.stack([fake_vector("a b"), fake_vector("c")])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(got, want, atol=1e-6)
    response = app.simulate_post("/embed", json={"inputs": "one", "normalize": False, "truncate": False})
    assert np.allclose(response.json, [fake_vector("one")], atol=1e-5)
    assert fake.calls[-1] == {"texts": ["one"], "truncate": False, "normalize": False, "prompt": None,
                              "prompt_name": None, "dimensions": None}
    app.simulate_post("/embed", json={"inputs": ["q"], "prompt_name": "query", "prompt": None})
    assert fake.calls[-1]["prompt_name"] == "query"
    for bad in ({"prompt": 3}, {"prompt_name": ["x"]}, {"dimensions": "8"}, {"dimensions": True}):
        response = app.simulate_post("/embed", json={"inputs": ["q"], **bad})
        assert response.status_code == 422, bad


def test_openai_embeddings_float_and_base64(app):
    response = app.simulate_post("/v1/embeddings", json={"input": ["x y z", "w"], "model": "fake-model"})
    assert response.status_code == 200
    assert response.json["model"] == "fake-model" and response.json["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert [d["index"] for d in response.json["data"]] == [0, 1]
    assert np.allclose(response.json["data"][0]["embedding"], fake_vector("x y z"), atol=1e-5)
    response = app.simulate_post("/v1/embeddings", json={"input": "w", "encoding_format": "base64"})
    raw = np.frombuffer(base64.b64decode(response.json["data"][0]["embedding"]), "<f4")
    assert np.array_equal(raw, fake_vector("w"))
    assert app.simulate_post("/v1/embeddings", json={"input": "w", "dimensions": DIM}).status_code == 200


@pytest.mark.parametrize("path,body,status,kind", [
    ("/embed", {"inputs": []}, 422, "empty list"),
    ("/embed", {}, 422, "is required"),
    ("/embed", {"inputs": [1, 2, 3]}, 422, "token arrays"),
    ("/embed", {"inputs": ["ok", 3]}, 422, "inputs[1]"),
    ("/embed", {"inputs": ["a\x00b"]}, 422, "NUL"),
    ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "normalize"),
    ("/embed", {"inputs": ["t"] * 6}, 413, "SHM_EMBED_MAX_INPUTS"),
    ("/embed", {"inputs": ["x" * 51]}, 413, "SHM_EMBED_MAX_INPUT_CHARS"),
    ("/embed", ["not", "an", "object"], 422, "JSON object"),
    ("/v1/embeddings", {"model": "m"}, 422, "'input' is required"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 422, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 422, "dimensions"),
    ("/v1/embeddings", {"input": "x", "model": 5}, 422, "model"),
])
def test_bad_requests_get_their_status_and_a_json_error(app, path, body, status, kind):
    r = app.simulate_post(path, json=body)
    assert r.status_code == status, r.text
    assert kind.lower() in (r.json["error"]["type"] + r.json["error"]["message"]).lower(), r.json


def test_body_media_type_and_size(app):
    assert app.simulate_post("/embed", body="{not json", headers={"content-type": "application/json"}
                             ).status_code == 400
    r = app.simulate_post("/embed", body="inputs=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json["error"]["type"] == "unsupported_media_type"
    big = '{"inputs": ["' + "x" * 5000 + '"]}'
    assert app.simulate_post("/embed", body=big, headers={"content-type": "application/json"}).status_code == 413


@pytest.mark.parametrize("error,status,retry_after", [
    (SidecarUnavailable("gone", reason="absent"), 503, "1"),
    (SidecarTimeout("slow"), 503, "1"),
    (NoRingAvailable("all leased"), 503, "1"),
    (LayoutMismatch("v1 vs v2"), 503, "5"),
    (RingFull("busy", retry_after_s=2.0), 429, "2"),
    (RequestTooLarge("long", limit=1, actual=2, what="tokens"), 413, None),
    (InvalidInput("surrogate"), 422, None),
    (ModelFailed("oom", code=5), 500, None),
    (RuntimeError("a bug"), 500, None),
])
def test_each_client_error_maps_to_its_status(app, fake, error, status, retry_after):
    fake.fail = error
    response = app.simulate_post("/embed", json={"inputs": ["x"]})
    assert response.status_code == status, response.text
    assert response.json["error"]["message"]
    assert response.headers.get("retry-after") == retry_after
    if isinstance(error, RuntimeError):
        assert "a bug" not in response.text, "an unexpected error's text stays in the log"


def test_health_ready_info_and_the_original_endpoints(app, fake):
    assert app.simulate_get("/health").json == {"status": "ok"}
    assert app.simulate_get("/ready").json["status"] == "ready"
    info = app.simulate_get("/info").json
    assert info["dimension"] == DIM and info["limits"]["max_inputs"] == 5
    assert app.simulate_get("/embedding/health").json["embedding_server"] == "connected"
    stats = app.simulate_get("/embedding/stats").json
    assert stats["status"] == "ok" and stats["worker"]["total_requests"] == 0
    metrics = app.simulate_get("/metrics")
    assert metrics.status_code == 200 and "shm_embed_sidecar_up 1.0" in metrics.text
    fake.fail = SidecarUnavailable("gone", reason="absent")
    assert app.simulate_get("/health").status_code == 200
    assert app.simulate_get("/ready").status_code == 503
    r = app.simulate_get("/embedding/health")
    assert r.status_code == 503 and r.json["status"] == "degraded"
    assert app.simulate_get("/embedding/stats").status_code == 503
    assert "shm_embed_sidecar_up 0.0" in app.simulate_get("/metrics").text


def test_unknown_routes_and_methods_are_json_errors(app):
    r = app.simulate_get("/nope")
    assert r.status_code == 404 and r.json["error"]
    assert app.simulate_get("/embed").status_code == 405


def test_api_key(fake, tmp_path):
    app = testing.TestClient(create_app(fake, Settings.from_env({}, api_key="s3cret",
                                                                data_dir=str(tmp_path / "d"))))
    assert app.simulate_get("/health").status_code == 200
    r = app.simulate_post("/embed", json={"inputs": ["x"]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert app.simulate_post("/embed", json={"inputs": ["x"]},
                             headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert app.simulate_post("/embed", json={"inputs": ["x"]},
                             headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_request_id_is_echoed(app):
    r = app.simulate_get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert app.simulate_get("/health").headers["x-request-id"]


def test_collections_round_trip(app):
    assert app.simulate_put("/collections/notes").status_code == 201
    assert app.simulate_put("/collections/notes").status_code == 200
    r = app.simulate_post("/collections/notes/documents",
                          json={"documents": [{"id": "a", "text": "red apples"}, {"id": "b", "text": "blue sky"}]})
    assert r.status_code == 200, r.text
    r = app.simulate_post("/collections/notes/search", json={"query": "blue sky", "top_k": 2})
    assert r.status_code == 200 and r.json["results"][0]["id"] == "b"
    assert [c["name"] for c in app.simulate_get("/collections").json["collections"]] == ["notes"]
    assert app.simulate_get("/collections/notes/documents/a").status_code == 200
    assert app.simulate_delete("/collections/notes/documents/a").status_code == 200
    assert app.simulate_get("/collections/notes/documents/a").status_code == 404
    assert app.simulate_post("/collections/notes/search", json={"query": 3}).status_code == 422
    assert app.simulate_post("/collections/notes/documents", json={}).status_code == 422
    assert app.simulate_delete("/collections/notes").status_code == 200
    assert app.simulate_get("/collections/notes").status_code == 404
    assert app.simulate_post("/collections/none/search", json={"query": "x"}).status_code == 404


def test_models_in_openai_shape_and_unknown_models_are_404(app):
    response = app.simulate_get("/v1/models")
    assert response.status_code == 200 and response.json["object"] == "list"
    assert [m["id"] for m in response.json["data"]] == ["fake-model", "fake-reranker", "fake-classifier"]
    assert response.json["data"][0]["object"] == "model" and response.json["data"][1]["kind"] == "rerank"
    assert response.json["data"][2]["kind"] == "classify" and response.json["data"][2]["dimension"] == 3
    assert app.simulate_get("/v1/models/fake-model").json["id"] == "fake-model"
    for path, kw in (("/v1/models/text-embedding-ada-002", {}),
                     ("/v1/embeddings", {"json": {"input": "x", "model": "text-embedding-ada-002"}})):
        response = (app.simulate_get(path) if not kw else app.simulate_post(path, **kw))
        assert response.status_code == 404, path
        err = response.json["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and "fake-model" in err["message"]
    ok = app.simulate_post("/v1/embeddings", json={"input": "x", "model": "org/fake-model"})  # a hub id
    assert ok.status_code == 200


def test_predict_answers_each_input_its_labels_best_first_in_tei_shape(app, fake):
    want = fake.classify_detailed(["calm day", ("is it up?", "yes"), "late again"])
    batch = app.simulate_post("/predict", json={"inputs": ["calm day", ["is it up?", "yes"], "late again"]})
    assert batch.status_code == 200, batch.text
    assert len(batch.json) == 3
    for row, scores in zip(batch.json, want.scores):
        assert [x["score"] for x in row] == sorted((x["score"] for x in row), reverse=True)
        assert {x["label"]: x["score"] for x in row} == pytest.approx(dict(zip(FAKE_LABELS, scores.tolist())))
    assert fake.calls[-1]["inputs"][1] == ("is it up?", "yes") and fake.calls[-1]["truncate"] is True
    one = app.simulate_post("/predict", json={"inputs": "calm day"}).json  # one input: its list alone
    assert one == batch.json[0]
    pair = app.simulate_post("/predict", json={"inputs": ["is it up?", "yes"]}).json  # two strings: one pair
    assert pair == batch.json[1]
    raw = app.simulate_post("/predict", json={"inputs": ["calm day"], "raw_scores": True, "truncate": False}).json
    assert fake.calls[-1]["truncate"] is False
    assert {x["label"]: x["score"] for x in raw[0]} == pytest.approx(
        dict(zip(FAKE_LABELS, fake.classify_detailed(["calm day"], raw_scores=True).scores[0].tolist())))


def test_classify_answers_in_vllm_shape(app, fake):
    response = app.simulate_post("/classify", json={"input": ["calm day", "late again"], "model": "fake-classifier"})
    assert response.status_code == 200, response.text
    body = response.json
    assert body["object"] == "list" and body["model"] == "fake-classifier" and body["id"].startswith("classify-")
    want = fake.classify_detailed(["calm day", "late again"])
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["num_classes"] == 3
        assert item["probs"] == pytest.approx(want.scores[i].tolist())
        assert item["label"] == FAKE_LABELS[int(np.argmax(want.scores[i]))]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == want.total_tokens
    one = app.simulate_post("/classify", json={"input": "calm day"}).json
    assert one["data"][0]["probs"] == body["data"][0]["probs"]


@pytest.mark.parametrize("path,body,status,words", [
    ("/predict", {}, 422, "'inputs' is required"),
    ("/predict", {"inputs": []}, 422, "'inputs' must not be an empty list"),
    ("/predict", {"inputs": 3}, 422, "'inputs' must be a string, a pair"),
    ("/predict", {"inputs": ["a", "b", ["c"]]}, 422, "'inputs[2]' must be a string or a pair"),
    ("/predict", {"inputs": ["a", 1, "c"]}, 422, "'inputs[1]'"),
    ("/predict", {"inputs": ["a"] * 6}, 413, "SHM_EMBED_MAX_INPUTS"),
    ("/predict", {"inputs": "a", "raw_scores": "yes"}, 422, "'raw_scores' must be true or false"),
    ("/predict", {"inputs": "a", "model": "nope"}, 404, "'nope'"),
    ("/classify", {"input": []}, 422, "'input' must not be an empty list"),
    ("/classify", {"input": [["a", "b"]]}, 422, "'input'"),
    ("/classify", {"input": "a", "model": "fake-reranker"}, 404, "fake-reranker"),
])
def test_classification_refuses_bad_input_naming_the_field(app, path, body, status, words):
    response = app.simulate_post(path, json=body)
    assert response.status_code == status, response.text
    assert words in response.json["error"]["message"]


def test_rerank_in_tei_and_cohere_shapes_best_first(app, fake):
    docs = ["cats purr", "dogs bark", "fish swim", "birds sing"]
    want = fake.rerank_detailed("pets", docs).scores
    order = list(np.argsort(-want, kind="stable"))
    response = app.simulate_post("/rerank", json={"query": "pets", "texts": docs, "return_text": True})
    assert response.status_code == 200
    assert [x["index"] for x in response.json] == order
    assert [x["text"] for x in response.json] == [docs[i] for i in order]
    assert [x["score"] for x in response.json] == pytest.approx([float(want[i]) for i in order], abs=1e-6)
    raw = app.simulate_post("/rerank", json={"query": "pets", "texts": docs, "raw_scores": True}).json
    assert "text" not in raw[0] and all(-1.0 <= x["score"] <= 1.0 for x in raw)
    assert {x["score"] for x in raw} != {x["score"] for x in response.json}  # raw logits, not sigmoids
    cohere = app.simulate_post("/v1/rerank", json={"model": "fake-reranker", "query": "pets", "top_n": 2,
                                                   "documents": [{"text": d} for d in docs], "return_documents": True})
    assert cohere.status_code == 200 and cohere.json["model"] == "fake-reranker"
    assert [x["index"] for x in cohere.json["results"]] == order[:2]
    assert cohere.json["results"][0]["document"] == {"text": docs[order[0]]}
    assert cohere.json["results"][0]["relevance_score"] == pytest.approx(float(want[order[0]]), abs=1e-6)
    assert cohere.json["usage"]["total_tokens"] > 0
    for body, status in (({"query": "q", "documents": docs, "model": "nope"}, 404),
                         ({"query": "", "documents": docs}, 422), ({"query": "q"}, 422),
                         ({"query": "q", "documents": "one string"}, 422),
                         ({"query": "q", "documents": docs, "top_n": 0}, 422),
                         ({"query": "q", "documents": ["x"] * 6}, 413)):
        response = app.simulate_post("/v1/rerank", json=body)
        assert response.status_code == status, body
    assert app.simulate_post("/v1/rerank", json={"query": "q", "documents": docs, "model": "nope"}
                             ).json["error"]["code"] == "model_not_found"


def test_a_search_reranks_no_more_candidates_than_a_request_may_send(app):
    assert app.simulate_put("/collections/many").status_code == 201
    for chunk in (range(0, 4), range(4, 8)):  # max_inputs is 5 here
        docs = [{"id": str(i), "text": f"note number {i}"} for i in chunk]
        assert app.simulate_post("/collections/many/documents", json={"documents": docs}).status_code == 200
    ok = app.simulate_post("/collections/many/search", json={"query": "note", "top_k": 5, "rerank": True})
    assert ok.status_code == 200 and len(ok.json["results"]) == 5
    assert all("rerank_score" in r for r in ok.json["results"])
    over = app.simulate_post("/collections/many/search", json={"query": "note", "top_k": 8, "rerank": True})
    assert over.status_code == 413 and "SHM_EMBED_MAX_INPUTS" in over.json["error"]["message"]


def test_rerank_applies_the_rerankers_prompts(app, fake):
    docs = ["cats purr", "dogs bark", "fish swim"]
    def scores(path, field, key, **extra):
        response = app.simulate_post(path, json={"query": "pets", field: docs, **extra})
        assert response.status_code == 200, response.text
        rows = response.json if isinstance(response.json, list) else response.json["results"]
        return {x["index"]: x[key] for x in rows}

    for path, field, key in (("/rerank", "texts", "score"), ("/v1/rerank", "documents", "relevance_score")):
        plain = scores(path, field, key)
        named = scores(path, field, key, prompt_name="short")
        assert named != plain  # the prompt went before the query
        assert named == scores(path, field, key, prompt="q: ")
        want = fake.rerank_detailed("q: pets", docs).scores
        assert [named[i] for i in range(3)] == pytest.approx(want.tolist(), abs=1e-6)
        response = app.simulate_post(path, json={"query": "pets", field: docs, "prompt_name": "no-such-prompt"})
        assert response.status_code == 422 and "no-such-prompt" in response.json["error"]["message"]
        for bad in ({"prompt": 3}, {"prompt_name": ["x"]}, {"prompt": "p" * 3000}):
            assert app.simulate_post(path, json={"query": "pets", field: docs, **bad}).status_code in (413, 422)


#: A body of every route that takes one; each of its strings, and each key, is a text field to corrupt.
ROUTE_BODIES = [
    ("POST", "/embed", {"inputs": ["a b"], "prompt": "p: ", "prompt_name": "query"}),
    ("POST", "/v1/embeddings", {"input": "a", "model": "fake-model", "encoding_format": "float", "prompt_name": "q"}),
    ("POST", "/rerank", {"query": "q", "texts": ["a", "b"], "model": "fake-reranker", "prompt": "p: ",
                         "prompt_name": "short"}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}], "model": "fake-reranker"}),
    ("POST", "/predict", {"inputs": ["a", "b", ["c", "d"]], "model": "fake-classifier"}),
    ("POST", "/classify", {"input": ["a", "b"], "model": "fake-classifier"}),
    ("PUT", "/collections/kb", {"options": {"model": "fake-model", "index": "flat", "query_prompt": "q: ",
                                            "document_prompt": "d: "}}),
    ("POST", "/collections/kb/documents", {"documents": [
        {"id": "d1", "text": "some text", "url": "http://x/", "metadata": {"k": "v", "deep": {"l": ["x", {"y": "z"}]}}},
        "plain text"]}),
    ("POST", "/collections/kb/search", {"query": "q", "filter": {"k": ["v"]}, "rerank": {"model": "fake-reranker"}}),
    ("POST", "/search/web", {"query": "q", "urls": ["http://127.0.0.1:9/"], "rerank": {"model": "fake-reranker"}}),
]


def corrupted(value, bad: str, path: str = ""):
    """(where, copy of ``value``) with one string, or one key, replaced by
    ``bad``: ``where`` is the JSON path of the string, or of the object whose
    key it is ("body" for the body's own keys)."""
    if isinstance(value, str):
        yield path, bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            for where, new in corrupted(v, bad, f"{path}[{i}]"):
                yield where, [*value[:i], new, *value[i + 1:]]
    elif isinstance(value, dict):
        for k, v in value.items():
            for where, new in corrupted(v, bad, f"{path}.{k}" if path else k):
                yield where, {**value, k: new}
            yield path or "body", {(bad if key == k else key): v for key, v in value.items()}


@pytest.mark.parametrize("method,path,body", ROUTE_BODIES, ids=[f"{m} {p}" for m, p, _ in ROUTE_BODIES])
def test_every_text_field_of_every_route_refuses_broken_text(app, method, path, body):
    """Half an emoji (a lone surrogate, as JavaScript's slice leaves one),
    or a NUL, anywhere in a body, is a 422 naming the field; bytes that are
    not UTF-8 are a 400. Never a 500, and nothing reaches the model or the store."""
    cases = 0
    for bad, what in (("half \ud83d an emoji", "surrogate"), ("\udc00", "surrogate"), ("a\x00b", "U+0000")):
        for where, doc in corrupted(body, bad):
            response = app.simulate_request(method, path, body=json.dumps(doc),
                                            headers={"content-type": "application/json"})
            assert response.status_code == 422, (where, bad, response.text)
            message = response.json["error"]["message"]
            assert f"'{where}'" in message or where == "body" and "key of the body" in message, (where, message)
            assert what in message, message
            cases += 1
    assert cases >= 9
    marker = "\N{SNOWMAN}"
    raw = json.dumps(next(corrupted(body, marker))[1], ensure_ascii=False).encode()
    for invalid in (b"\xed\xa0\xbd", b"\xff", b"\xc3"):
        response = app.simulate_request(method, path, body=raw.replace(marker.encode(), invalid),
                                        headers={"content-type": "application/json"})
        assert response.status_code == 400 and "UTF-8" in response.json["error"]["message"], response.text
    assert app.simulate_get("/collections").json["collections"] == []  # no write got through
    assert app.simulate_post("/embed", json={"inputs": ["still serving"]}).status_code == 200


def test_an_unknown_model_named_with_a_surrogate_is_still_answered(app):
    """The 404's own message held the name, and could not be written."""
    for path, body in (("/v1/embeddings", {"input": "x", "model": "\ud83d"}),
                       ("/rerank", {"query": "q", "texts": ["a"], "model": "x\ud83d"})):
        r = app.simulate_post(path, body=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 422 and "'model'" in r.json["error"]["message"], r.text


def test_a_surrogate_already_stored_never_fails_a_read(app, tmp_path):
    """Metadata stored before text was checked (here written straight into
    the database) is answered with U+FFFD in place of each half character."""
    assert app.simulate_put("/collections/kb").status_code == 201
    docs = [{"id": "a", "text": "red apples", "metadata": {"k": "v"}}, {"id": "b", "text": "blue sky"}]
    assert app.simulate_post("/collections/kb/documents", json={"documents": docs}).status_code == 200
    with sqlite3.connect(tmp_path / "data" / COLLECTIONS_DB) as db:
        db.execute("UPDATE documents SET metadata = ? WHERE id = 'a'", ('{"k": "\\ud83d", "\\udc00x": [1]}',))
    response = app.simulate_post("/collections/kb/search", json={"query": "an unrelated query", "top_k": 10})
    assert response.status_code == 200, response.text
    got = {x["id"]: x["metadata"] for x in response.json["results"]}
    assert got["a"] == {"k": "\ufffd", "\ufffdx": [1]} and got["b"] == {}
    response = app.simulate_get("/collections/kb/documents/a")
    assert response.status_code == 200 and response.json["metadata"]["k"] == "\ufffd"
    response = app.simulate_post("/collections/kb/search", json={"query": "q", "filter": {"k": "v"}})
    assert response.status_code == 200 and response.json["results"] == []
