"""Long inputs, tokens and Cohere's /v2/embed through a real sidecar and a
real Gunicorn: a tiny model cut to 16 tokens (so short texts are long), and
the same model with prompts, marked Matryoshka. Chunked and left-truncated
vectors are checked against SentenceTransformer run on ids cut by hand."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from shm_protocol import quantize
from shm_protocol.errors import InvalidInput, RequestTooLarge
from tests.helpers import client_for, linked_model_folder, start_sidecar, start_web, stop_and_check

LIMIT = 16
LONG = "the quick brown fox jumps over the lazy dog while " * 5 + "and stops"
PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def short_st(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    from sidecar.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("tiny16"), max_seq_length=LIMIT)
    return path, SentenceTransformer(str(path), device="cpu")


@pytest.fixture(scope="module")
def sidecar(short_st, tmp_path_factory):
    path, _ = short_st
    prompted = linked_model_folder(path, tmp_path_factory.mktemp("prompted") / "st", prompts=PROMPTS)
    sc = start_sidecar(tmp_path_factory.mktemp("sc16"), None, SHM_EMBED_TORCH_THREADS="1",
                       SHM_EMBED_MODELS=f"short={path},prompted={prompted};matryoshka")
    yield sc
    stop_and_check(sc)


@pytest.fixture(scope="module")
def http(sidecar, tmp_path_factory):
    web = start_web(tmp_path_factory.mktemp("web16"), sidecar.env, workers=1, SHM_EMBED_MAX_REQUEST_TOKENS=2000)
    with httpx.Client(base_url=web.base, timeout=30) as client:
        yield client
    assert web.stop() == 0


def post(http, path, doc):
    return http.post(path, content=json.dumps(doc), headers={"content-type": "application/json"})


def error(r, status: int, contains: str) -> None:
    assert r.status_code == status, r.text
    assert contains in r.json()["error"]["message"], r.text


def st_on_ids(st, rows: list[list[int]]) -> np.ndarray:
    """SentenceTransformer's vectors of token ids as given (special tokens included)."""
    import torch

    out = []
    for row in rows:
        ids = torch.tensor([row])
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        with torch.inference_mode():
            out.append(st(features)["sentence_embedding"][0].numpy())
    return np.array(out, dtype=np.float32)


def content_ids(st, text: str) -> list[int]:
    return st.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chunked_vector_is_the_token_weighted_mean_of_its_windows(sidecar, short_st, http):
    _, st = short_st
    cls, sep = st.tokenizer.cls_token_id, st.tokenizer.sep_token_id
    content = content_ids(st, LONG)
    room = LIMIT - 2
    windows = [content[i:i + room] for i in range(0, len(content), room)]
    assert len(windows) >= 4 and len(windows[-1]) < room
    rows = st_on_ids(st, [[cls] + w + [sep] for w in windows])
    weights = np.array([len(w) for w in windows], np.float64)
    want = (rows * weights[:, None]).sum(0) / weights.sum()
    with client_for(sidecar) as c:
        res = c.embed_detailed([LONG, "short one"], chunk=True, model="short")
        unit = c.embed([LONG], chunk=True, normalize=True, model="short")[0]
    assert np.abs(res.vectors[0] - want).max() <= 1e-5
    assert np.abs(res.vectors[1] - st.encode("short one")).max() <= 1e-5
    assert res.token_counts[0] == len(content) + 2 * len(windows)
    assert np.abs(unit - want / np.linalg.norm(want)).max() <= 1e-5
    r = post(http, "/embed", {"inputs": LONG, "chunk": True, "normalize": False, "model": "short"})
    assert r.status_code == 200, r.text
    assert np.abs(np.array(r.json()[0]) - want).max() <= 1e-5


def test_left_truncation_keeps_the_end(sidecar, short_st, http):
    _, st = short_st
    content = content_ids(st, LONG)
    want = st_on_ids(st, [[st.tokenizer.cls_token_id] + content[-(LIMIT - 2):] + [st.tokenizer.sep_token_id]])[0]
    with client_for(sidecar) as c:
        got = c.embed([LONG], truncation_direction="left", model="short")[0]
        assert np.abs(got - want).max() <= 1e-5
        right = c.embed([LONG], truncate=True, model="short")[0]
        assert np.abs(right - st.encode(LONG)).max() <= 1e-5  # SentenceTransformer cuts the end
        with pytest.raises(RequestTooLarge, match=f"limit is {LIMIT}"):
            c.embed([LONG], truncate=False, model="short")
        with pytest.raises(InvalidInput, match="exclude"):
            c.embed([LONG], truncate=True, chunk=True)
    with client_for(sidecar, long_inputs="refuse") as c:  # the setting is the default of a call
        with pytest.raises(RequestTooLarge):
            c.embed([LONG], model="short")
        assert np.abs(c.embed([LONG], truncation_direction="left", model="short")[0] - want).max() <= 1e-5
    r = post(http, "/embed", {"inputs": [LONG], "truncation_direction": "Left", "normalize": False, "model": "short"})
    assert r.status_code == 200 and np.abs(np.array(r.json()[0]) - want).max() <= 1e-5


@pytest.mark.parametrize("doc, status, contains", [
    ({"inputs": LONG, "truncate": False}, 413, f"limit is {LIMIT}"),
    ({"inputs": LONG, "truncation_direction": "middle"}, 422, "'truncation_direction' must be 'right' or 'left'"),
    ({"inputs": LONG, "chunk": "yes"}, 422, "'chunk' must be true or false"),
    ({"inputs": LONG, "chunk": True, "truncate": True}, 422, "exclude each other"),
])
def test_embed_long_input_fields_are_checked(http, doc, status, contains):
    error(post(http, "/embed", doc), status, contains)


def test_tokenize_and_decode_in_teis_shape(http, short_st):
    _, st = short_st
    r = post(http, "/tokenize", {"inputs": "Hello wörld!"})
    assert r.status_code == 200, r.text
    [tokens] = r.json()
    assert tokens[0] == {"id": st.tokenizer.cls_token_id, "text": "[CLS]", "special": True, "start": None,
                         "stop": None}
    assert [(t["text"], t["start"], t["stop"], t["special"]) for t in tokens[1:]] == [
        ("Hello", 0, 5, False), ("wörld", 6, 11, False), ("!", 11, 12, False), ("[SEP]", None, None, True)]
    ids = [t["id"] for t in tokens]
    assert ids == st.tokenizer("Hello wörld!")["input_ids"]
    two = post(http, "/tokenize", {"inputs": ["a", LONG], "add_special_tokens": False}).json()
    assert len(two) == 2 and len(two[1]) == len(content_ids(st, LONG)) > LIMIT  # not truncated
    prompted = post(http, "/tokenize", {"inputs": "x", "prompt_name": "query", "model": "prompted"}).json()[0]
    assert [t["text"] for t in prompted[1:-1]] == ["query", ":", "x"] and prompted[3]["start"] == 7
    assert post(http, "/decode", {"ids": ids}).json() == ["hello world!"]
    assert post(http, "/decode", {"ids": [ids, ids[:2]], "skip_special_tokens": False}).json() == [
        "[CLS] hello world! [SEP]", "[CLS] hello"]


@pytest.mark.parametrize("path, doc, status, contains", [
    ("/tokenize", {}, 422, "'inputs' is required"),
    ("/tokenize", {"inputs": 5}, 422, "'inputs' must be a string or a list of strings"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": "no"}, 422, "'add_special_tokens' must be true or false"),
    ("/tokenize", {"inputs": "a", "prompt_name": "nope", "model": "prompted"}, 422, "prompts: passage, query"),
    ("/tokenize", {"inputs": "a", "model": "other"}, 404, "'other' does not exist"),
    ("/tokenize", {"inputs": [LONG] * 40}, 413, "over the limit of 2000 per request"),
    ("/decode", {}, 422, "'ids' is required"),
    ("/decode", {"ids": [1, 30522]}, 422, "'ids[1]' is 30522; token ids of this model are 0 to 30521"),
    ("/decode", {"ids": [[7], [-3]]}, 422, "'ids[1][0]' is -3"),
    ("/decode", {"ids": [1, 2.5]}, 422, "'ids[1]' is float"),
    ("/decode", {"ids": [2 ** 70]}, 422, "token ids of this model are 0 to"),
    ("/decode", {"ids": "hello"}, 422, "list of token ids"),
    ("/decode", {"ids": [1], "skip_special_tokens": 1}, 422, "'skip_special_tokens' must be true or false"),
])
def test_tokenize_and_decode_refuse_bad_input(http, path, doc, status, contains):
    error(post(http, path, doc), status, contains)


def test_cohere_embed_gives_every_type_of_one_vector(sidecar, http):
    texts = ["first text", "a second one"]
    r = post(http, "/v2/embed", {"texts": texts, "model": "prompted", "input_type": "search_query",
                                 "embedding_types": ["base64", "float", "int8", "uint8", "binary", "ubinary"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["texts"] == texts and body["id"] and body["meta"]["billed_units"]["input_tokens"] > 0
    emb = body["embeddings"]
    assert list(emb) == list(quantize.EMBEDDING_TYPES)
    with client_for(sidecar) as c:
        want = c.embed(texts, model="prompted", prompt_name="query", normalize=True)
        plain = c.embed(texts, model="prompted", prompt_name=None, normalize=True)
        short = c.embed(texts, model="short", normalize=True)
    floats = np.array(emb["float"], np.float32)
    assert np.abs(floats - want).max() <= 1e-6 and np.abs(floats - plain).max() > 1e-3  # the prompt was used
    for kind in ("int8", "uint8", "binary", "ubinary"):
        assert emb[kind] == quantize.quantize(floats, kind).tolist(), kind
    assert [np.frombuffer(base64.b64decode(s), "<f4").tolist() for s in emb["base64"]] == floats.tolist()
    # A model without prompts embeds the texts as they are, whatever the input type.
    r = post(http, "/v2/embed", {"texts": texts, "model": "short", "input_type": "search_document"})
    assert list(r.json()["embeddings"]) == ["float"]
    assert np.abs(np.array(r.json()["embeddings"]["float"]) - short).max() <= 1e-6


def test_cohere_truncate_and_output_dimension(sidecar, http):
    with client_for(sidecar) as c:
        left = c.embed([LONG], model="short", truncation_direction="left", normalize=True)[0]
        cut = c.embed([LONG], model="prompted", dimensions=8, normalize=True)[0]
    r = post(http, "/v2/embed", {"texts": [LONG], "model": "short", "truncate": "START"})
    assert np.abs(np.array(r.json()["embeddings"]["float"][0]) - left).max() <= 1e-6
    error(post(http, "/v2/embed", {"texts": [LONG], "model": "short", "truncate": "NONE"}), 413,
          f"limit is {LIMIT}")
    r = post(http, "/v2/embed", {"texts": [LONG], "model": "prompted", "output_dimension": 8,
                                 "embedding_types": ["float", "int8"]})
    vec = np.array(r.json()["embeddings"]["float"][0])
    assert vec.shape == (8,) and abs(np.linalg.norm(vec) - 1) < 1e-5 and np.abs(vec - cut).max() <= 1e-6
    assert len(r.json()["embeddings"]["int8"][0]) == 8


@pytest.mark.parametrize("doc, status, contains", [
    ({}, 422, "'texts' is required"),
    ({"texts": "one"}, 422, "'texts' must be a list"),
    ({"texts": ["a"], "input_type": "image"}, 422,
     "'input_type' must be 'search_query', 'search_document', 'classification' or 'clustering'"),
    ({"texts": ["a"], "embedding_types": ["float", "int4"]}, 422,
     "'embedding_types[1]' is 'int4'; accepted values: float, int8, uint8, binary, ubinary, base64"),
    ({"texts": ["a"], "embedding_types": "float"}, 422, "'embedding_types' must be a non-empty list"),
    ({"texts": ["a"], "truncate": "MIDDLE"}, 422, "'truncate' must be 'NONE', 'START' or 'END'"),
    ({"texts": ["a"], "output_dimension": 0}, 422, "'output_dimension' must be a positive integer"),
    ({"texts": ["a"], "model": "short", "output_dimension": 8}, 422,
     "'output_dimension' is 8, but short gives 32 dimensions and is not trained for truncation (Matryoshka)"),
    ({"texts": ["a"], "model": "prompted", "output_dimension": 33}, 422,
     "'output_dimension' is 33; prompted gives 1 to 32"),
    ({"texts": ["a"], "output_dimension": 2**70}, 422, f"'output_dimension' is {2**70}; short gives 1 to 32"),
    ({"texts": ["a"], "model": "nope"}, 404, "'nope' does not exist"),
])
def test_cohere_embed_refuses_bad_input(http, doc, status, contains):
    error(post(http, "/v2/embed", doc), status, contains)


def test_openai_embeddings_follow_the_long_input_setting(sidecar):
    """/v1/embeddings names no long-input option, so SHM_EMBED_LONG_INPUTS
    decides, as for /embed (it used to cut whatever the setting said)."""
    from falcon import testing

    from web.app import create_app

    for setting, status in (("refuse", 413), ("chunk", 200)):
        with client_for(sidecar, long_inputs=setting) as c:
            r = testing.TestClient(create_app(c, c.settings)).simulate_post(
                "/v1/embeddings", json={"input": [LONG], "model": "short"})
            assert r.status_code == status, r.text
            if status == 200:
                assert r.json["usage"]["total_tokens"] > LIMIT  # every window's tokens
            else:
                assert f"limit is {LIMIT}" in r.json["error"]["message"]


def test_the_local_fallback_cuts_and_chunks_alike(sidecar, short_st):
    from compat.fallback import FallbackClient
    from shm_protocol.config import Settings

    path, _ = short_st
    local = FallbackClient(Settings.from_env({}, use_ipc=False, model=str(path)))
    with client_for(sidecar) as c:
        for options in ({"chunk": True}, {"truncation_direction": "left"}, {"truncate": True}):
            want = c.embed([LONG, "x y"], model="short", **options)
            assert np.abs(local.embed([LONG, "x y"], **options) - want).max() <= 1e-5, options
        assert [t.ids for t in local.tokenize([LONG])] == [t.ids for t in c.tokenize([LONG], model="short")]
    assert local.decode([[101, 7592, 102]]) == ["hello"]
    with pytest.raises(InvalidInput, match="30521"):
        local.decode([30522])
