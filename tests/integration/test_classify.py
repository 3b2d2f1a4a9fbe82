"""Sequence classification against real models: the bundled MiniLM's
weights with a fresh three-label head (single-label: softmax; multi-label:
sigmoid), served by a real sidecar beside an embedding model, compared with
transformers' own text-classification pipeline, through the client and
over HTTP (POST /predict, POST /classify)."""

from __future__ import annotations

import functools

import httpx
import numpy as np
import pytest

from shm_protocol.errors import InvalidInput, ModelNotFound, RequestTooLarge
from sidecar.tiny import CLASSIFIER_LABELS
from tests.helpers import client_for, start_sidecar, start_web, stop_and_check

TEXTS = ["The service answered at once.", "The queue was full again and nothing moved.", "a", "ünïcödé text"]
PAIRS = [("Is the service up?", "It answered at once."), ("Is it raining?", "The queue was full.")]


@pytest.fixture(scope="module")
def classifiers(classifier_path, multi_label_classifier_path, tiny_model, tmp_path_factory):
    sc = start_sidecar(tmp_path_factory.mktemp("sc-classify"), None,
                       SHM_EMBED_MODELS=f"tiny={tiny_model},clf={classifier_path};classify,"
                                        f"clf-multi={multi_label_classifier_path}",
                       SHM_EMBED_TORCH_THREADS="1", SHM_EMBED_CALL_ROWS="16")
    yield sc
    stop_and_check(sc)


@functools.cache
def text_classification(path):
    from transformers import pipeline

    return pipeline("text-classification", model=str(path), top_k=None, device="cpu")


def pipeline_scores(path, inputs) -> list[dict]:
    """Each input's {label: score} from transformers' own pipeline."""
    classifier = text_classification(path)
    items = [x if isinstance(x, str) else {"text": x[0], "text_pair": x[1]} for x in inputs]
    return [{r["label"]: r["score"] for r in rows} for rows in classifier(items)]


def as_dicts(ranked) -> list[dict]:
    return [{r["label"]: r["score"] for r in rows} for rows in ranked]


def test_scores_equal_the_pipeline_s_softmax_and_multi_label_sigmoid(classifiers, classifier_path,
                                                                     multi_label_classifier_path):
    inputs = [*TEXTS, *PAIRS]
    with client_for(classifiers) as client:
        cards = {m["name"]: m for m in client.models()}
        assert (cards["clf"]["kind"], cards["clf"]["dimension"]) == ("classify", 3)
        assert cards["clf-multi"]["kind"] == "classify"  # found by its folder, without the flag
        assert client.info()["model"] == "tiny"  # a classifier is never the default
        for name, path in (("clf", classifier_path), ("clf-multi", multi_label_classifier_path)):
            got = client.classify(inputs, model=name)
            for rows in got:
                assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
            want = pipeline_scores(path, inputs)
            for mine, theirs in zip(as_dicts(got), want):
                assert set(mine) == set(CLASSIFIER_LABELS)
                assert max(abs(mine[label] - theirs[label]) for label in theirs) <= 1e-5, (name, mine, theirs)
            sums = client.classify_detailed(TEXTS, model=name).scores.sum(axis=1)
            if name == "clf":
                assert np.allclose(sums, 1.0, atol=1e-6)
            else:  # independent labels: sigmoids, which need not add up to one
                assert not np.allclose(sums, 1.0, atol=1e-3)
        default = client.classify_detailed(TEXTS[:2])
        assert default.model == "clf" and default.labels == CLASSIFIER_LABELS
        raw = client.classify_detailed(TEXTS[:2], model="clf", raw_scores=True).scores
        exp = np.exp(raw - raw.max(axis=1, keepdims=True))
        assert np.allclose(exp / exp.sum(axis=1, keepdims=True), default.scores, atol=1e-6)


def test_bad_calls_are_typed_errors(classifiers):
    with client_for(classifiers) as client:
        for model in ("nope", "tiny"):
            with pytest.raises(ModelNotFound, match=model):
                client.classify(TEXTS, model=model)
        for bad in ("one string", [3], [("a", "b", "c")], None):
            with pytest.raises(InvalidInput):
                client.classify(bad)
        assert client.classify([]) == []
        long = "word " * 2000
        with pytest.raises(RequestTooLarge):
            client.classify([long], truncate=False)
        assert len(client.classify([long])[0]) == 3  # cut at the model's limit
        with pytest.raises(ModelNotFound):
            client.embed(TEXTS, model="clf")


def test_http_predict_and_classify_give_the_pipeline_s_scores(classifiers, classifier_path, tmp_path):
    web = start_web(tmp_path, classifiers.env, workers=1)
    try:
        want = pipeline_scores(classifier_path, [*TEXTS, PAIRS[0]])
        with httpx.Client(base_url=web.base, timeout=30) as http:
            batch = http.post("/predict", json={"inputs": [*TEXTS, list(PAIRS[0])], "model": "clf"})
            assert batch.status_code == 200, batch.text
            for mine, theirs in zip(as_dicts(batch.json()), want):
                assert max(abs(mine[label] - theirs[label]) for label in theirs) <= 1e-5
            one = http.post("/predict", json={"inputs": list(PAIRS[0])}).json()  # two strings: one pair
            assert as_dicts([one])[0] == pytest.approx(want[-1], abs=1e-5)
            vllm = http.post("/classify", json={"input": TEXTS, "model": "clf"})
            assert vllm.status_code == 200, vllm.text
            body = vllm.json()
            assert body["object"] == "list" and body["model"] == "clf" and body["usage"]["total_tokens"] > 0
            for item, theirs in zip(body["data"], want):
                assert item["num_classes"] == 3
                assert item["probs"] == pytest.approx([theirs[label] for label in CLASSIFIER_LABELS], abs=1e-5)
                assert item["label"] == max(theirs, key=theirs.get)
            wrong = http.post("/predict", json={"inputs": "x", "model": "tiny"})
            assert wrong.status_code == 404 and "classification" in wrong.json()["error"]["message"]
            empty = http.post("/classify", json={"input": []})
            assert empty.status_code == 422 and "'input'" in empty.json()["error"]["message"]
    finally:
        assert web.stop() == 0


def test_the_asyncio_client_classifies_as_the_synchronous_one(classifiers):
    import asyncio

    from shm_protocol.aio import AsyncEmbeddingClient

    async def scores():
        async with await AsyncEmbeddingClient.connect(classifiers.settings) as client:
            ranked = await client.classify([*TEXTS, *PAIRS], model="clf")
            detailed = await client.classify_detailed(TEXTS, model="clf-multi", raw_scores=True)
            with pytest.raises(InvalidInput):
                await client.classify("one string")
            return ranked, detailed

    ranked, detailed = asyncio.run(scores())
    with client_for(classifiers) as client:
        assert as_dicts(ranked) == as_dicts(client.classify([*TEXTS, *PAIRS], model="clf"))
        want = client.classify_detailed(TEXTS, model="clf-multi", raw_scores=True)
    assert detailed.labels == want.labels and np.array_equal(detailed.scores, want.scores)
