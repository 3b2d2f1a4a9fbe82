"""Prompts and Matryoshka dimensions, applied as SentenceTransformer.encode
applies them: through the client, its encode drop-in and both HTTP forms,
against a real sidecar serving the bundled weights in a folder whose
sentence-transformers config names prompts (a default one among them) and
marks the model as trained for truncation."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.helpers import client_for, cosine_rows, linked_model_folder, start_sidecar, start_web, stop_and_check

PROMPTS = {"query": "query: ", "passage": "passage: ", "classification": "Classify the topic: "}
TEXTS = ["how do shared-memory rings work", "Semaphores wake the waiting worker.", "", "ünïcödé text"]


@pytest.fixture(scope="module")
def prompted_model(real_model_path, tmp_path_factory):
    """The bundled weights (linked, not copied) with prompts, a default prompt
    and the Matryoshka mark in config_sentence_transformers.json."""
    return linked_model_folder(real_model_path, tmp_path_factory.mktemp("prompted") / "prompted-minilm",
                               prompts=PROMPTS, default_prompt_name="query", matryoshka_dimensions=[384, 256, 128, 64])


@pytest.fixture(scope="module")
def prompted_st(prompted_model):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(prompted_model), device="cpu")


@pytest.fixture(scope="module")
def prompted_sidecar(prompted_model, tmp_path_factory):
    sc = start_sidecar(tmp_path_factory.mktemp("sc-prompted"), str(prompted_model))
    yield sc
    stop_and_check(sc)


def test_client_applies_prompts_as_sentence_transformers(prompted_sidecar, prompted_st):
    with client_for(prompted_sidecar) as client:
        cases = [
            ({}, {}),  # the model's default prompt ("query")
            ({"prompt_name": "passage"}, {"prompt_name": "passage"}),
            ({"prompt": "Represent this: "}, {"prompt": "Represent this: "}),
            ({"prompt": ""}, {"prompt": ""}),  # an explicit empty prompt: none
        ]
        for ours, theirs in cases:
            got = client.embed(TEXTS, **ours)
            ref = prompted_st.encode(TEXTS, **theirs)
            assert cosine_rows(got, ref).min() >= 0.99999, ours
        # The prompts change the vectors (the test would not see a dropped prompt otherwise).
        plain = prompted_st.encode(TEXTS, prompt="")
        assert cosine_rows(client.embed(TEXTS, prompt_name="passage"), plain).min() < 0.999
        # The drop-in takes SentenceTransformer.encode's arguments.
        one = client.encode(TEXTS[0], prompt_name="classification", truncate_dim=64, normalize_embeddings=True)
        ref = prompted_st.encode(TEXTS[0], prompt_name="classification", truncate_dim=64, normalize_embeddings=True)
        assert one.shape == (64,) and float(np.dot(one, ref)) >= 0.99999
        with pytest.raises(Exception, match="unknown prompt_name 'nope'"):
            client.embed(TEXTS, prompt_name="nope")
        with pytest.raises(Exception, match="not served"):
            client.encode(TEXTS, pool=object())


def test_client_cuts_dimensions_of_a_matryoshka_model(prompted_sidecar, prompted_st):
    with client_for(prompted_sidecar) as client:
        for d in (256, 128, 64):
            got = client.embed(TEXTS, dimensions=d, normalize=True)
            ref = prompted_st.encode(TEXTS, truncate_dim=d, normalize_embeddings=True)
            assert got.shape == (len(TEXTS), d)
            assert cosine_rows(got, ref).min() >= 0.99999
            assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        for bad in (0, 385, -1):
            with pytest.raises(Exception, match="dimensions"):
                client.embed(TEXTS, dimensions=bad)


def test_http_forms_take_prompts_and_dimensions(prompted_sidecar, prompted_st, tmp_path):
    web = start_web(tmp_path, prompted_sidecar.env, workers=1)
    try:
        with httpx.Client(base_url=web.base, timeout=30) as http:
            response = http.post("/v1/embeddings", json={"input": TEXTS, "prompt_name": "passage", "dimensions": 128})
            assert response.status_code == 200, response.text
            got = np.array([d["embedding"] for d in response.json()["data"]], np.float32)
            ref = prompted_st.encode(TEXTS, prompt_name="passage", truncate_dim=128, normalize_embeddings=True)
            assert got.shape == (len(TEXTS), 128) and cosine_rows(got, ref).min() >= 0.99999
            response = http.post("/embed", json={"inputs": TEXTS, "prompt": "Represent this: "})
            ref = prompted_st.encode(TEXTS, prompt="Represent this: ", normalize_embeddings=True)
            assert cosine_rows(np.asarray(response.json(), np.float32), ref).min() >= 0.99999
            response = http.post("/embed", json={"inputs": TEXTS})  # the default prompt
            assert cosine_rows(np.asarray(response.json(), np.float32), prompted_st.encode(TEXTS)).min() >= 0.99999
            response = http.post("/embed", json={"inputs": TEXTS, "prompt_name": "nope"})
            assert response.status_code == 422 and "nope" in response.json()["error"]["message"]
    finally:
        web.stop()


def test_dimensions_of_a_model_not_trained_for_them_are_a_422(real_sidecar, tmp_path):
    web = start_web(tmp_path, real_sidecar.env, workers=1)
    try:
        with httpx.Client(base_url=web.base, timeout=30) as http:
            response = http.post("/v1/embeddings", json={"input": "x", "dimensions": 128})
            assert response.status_code == 422
            assert "Matryoshka" in response.json()["error"]["message"]
            assert http.post("/v1/embeddings", json={"input": "x", "dimensions": 384}).status_code == 200
            response = http.post("/v1/embeddings", json={"input": [101, 2023, 102]})
            message = response.json()["error"]["message"]
            assert response.status_code == 422 and "check_embedding_ctx_length=False" in message
    finally:
        web.stop()
