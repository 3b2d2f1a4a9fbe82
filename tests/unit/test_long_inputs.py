"""Long inputs, quantized embedding types and TEI's tokens, in process: the
window and truncation ids against the tokenizer's own, the weighted mean
against a hand computation, binary codes against sentence-transformers'
quantize_embeddings, int8 codes against the float vectors of the real model."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from shm_protocol import long_inputs, quantize
from shm_protocol.errors import InvalidInput, RequestTooLarge
from shm_protocol.input_types import prompt_name_for
from shm_protocol.model_files import bundled_model_path, tokenizer_file
from shm_protocol.tokenizer import WorkerTokenizer
from shm_protocol.tokens import decode_ids, tokenize_texts

LIMIT = 16
LONG = "the quick brown fox jumps over the lazy dog while " * 5 + "and stops"


@pytest.fixture(scope="module")
def tok() -> WorkerTokenizer:
    return WorkerTokenizer(str(tokenizer_file(bundled_model_path())), LIMIT)


@pytest.mark.parametrize("truncate, direction, chunk, default, want", [
    (None, None, None, "refuse", "refuse"),
    (None, None, None, "chunk", "chunk"),
    (True, None, None, "chunk", "truncate"),
    (True, "left", None, "refuse", "truncate_left"),
    (None, "Left", None, "truncate", "truncate_left"),  # a direction asks for truncation
    (False, None, None, "truncate", "refuse"),
    (None, None, True, "truncate", "chunk"),
    (False, None, True, "truncate", "chunk"),
])
def test_policy_of_a_request(truncate, direction, chunk, default, want):
    assert long_inputs.resolve_policy(truncate, direction, chunk, default) == want


@pytest.mark.parametrize("args, match", [
    ((True, None, True), "exclude"), ((None, "up", None), "right, left"), (("yes", None, None), "truncate"),
])
def test_contradictory_or_wrong_options_are_refused(args, match):
    with pytest.raises(InvalidInput, match=match):
        long_inputs.resolve_policy(*args, "truncate")


def test_windows_hold_the_special_tokens_and_the_whole_text(tok):
    content = tok.encode_untruncated([LONG], add_special_tokens=False)[0].ids
    got = tok.tokenize_request([LONG, "short"], prompt=None, truncate=True, max_tokens=None, policy="chunk")
    room = LIMIT - 2
    n_windows = -(-len(content) // room)
    assert got.owners.tolist() == [0] * n_windows + [1]
    assert got.weights[:n_windows].tolist() == [room] * (n_windows - 1) + [len(content) - room * (n_windows - 1)]
    assert all(row[0] == 101 and row[-1] == 102 and len(row) <= LIMIT for row in got.ids)  # [CLS] ... [SEP]
    assert sum((row[1:-1] for row in got.ids[:n_windows]), []) == content
    assert got.token_counts.tolist() == [len(content) + 2 * n_windows, 3]
    with pytest.raises(RequestTooLarge):
        tok.tokenize_request([LONG], prompt=None, truncate=True, max_tokens=len(content), policy="chunk")


def test_left_and_right_truncation_keep_the_end_and_the_start(tok):
    content = tok.encode_untruncated([LONG], add_special_tokens=False)[0].ids
    left = tok.tokenize_request([LONG], prompt=None, truncate=True, max_tokens=None, policy="truncate_left")
    right = tok.tokenize_request([LONG], prompt=None, truncate=True, max_tokens=None, policy="truncate")
    assert left.ids == [[101] + content[-(LIMIT - 2):] + [102]]
    assert right.ids == [[101] + content[:LIMIT - 2] + [102]]
    with pytest.raises(RequestTooLarge, match=f"limit is {LIMIT}"):
        tok.tokenize_request([LONG], prompt=None, truncate=True, max_tokens=None, policy="refuse")
    prompted = tok.tokenize_request([LONG], prompt="query: ", truncate=True, max_tokens=None, policy="truncate_left")
    query = tok.encode_untruncated(["query: "], add_special_tokens=False)[0].ids
    assert prompted.ids == [[101] + query + content[-(LIMIT - 2 - len(query)):] + [102]]  # the prompt is kept


def test_weighted_mean_of_windows():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5, 6)).astype(np.float32)
    owners, weights = np.array([0, 0, 0, 1, 2]), np.array([14, 14, 3, 7, 0])
    got = long_inputs.combine_windows(rows, owners, weights, 3)
    want0 = (14 * rows[0].astype(np.float64) + 14 * rows[1] + 3 * rows[2]) / 31
    assert np.allclose(got[0], want0, atol=1e-6)
    assert np.array_equal(got[1], rows[3]) and np.array_equal(got[2], rows[4])  # one window: itself


def test_tokens_carry_offsets_into_the_text_the_model_reads(tok):
    [one] = tokenize_texts(tok, ["Hello wörld!"], prompt="query: ")
    assert one.text == "query: Hello wörld!"
    assert one.tokens[0].as_dict() == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert [(t.text, t.start, t.stop) for t in one.tokens[1:-1]] == [
        ("query", 0, 5), (":", 5, 6), ("Hello", 7, 12), ("wörld", 13, 18), ("!", 18, 19)]
    [plain] = tokenize_texts(tok, [LONG], add_special_tokens=False)
    assert len(plain.ids) > LIMIT and not any(t.special for t in plain.tokens)  # not truncated
    assert decode_ids(tok, [one.ids, plain.ids[:3]], vocab_size=30522) == ["query : hello world!", "the quick brown"]
    assert decode_ids(tok, one.ids[:2], vocab_size=30522, skip_special_tokens=False) == ["[CLS] query"]
    with pytest.raises(RequestTooLarge, match=f"{len(plain.ids)} tokens, over the limit of 20"):
        tokenize_texts(tok, [LONG], add_special_tokens=False, max_tokens=20)


@pytest.mark.parametrize("ids, match", [
    ([1, 30522], r"'ids\[1\]' is 30522; token ids of this model are 0 to 30521"),
    ([[5], [-1]], r"'ids\[1\]\[0\]' is -1"),
    ([1, "2"], r"'ids\[1\]' is str"),
    ([[1], 2], "list of token ids"),
    ("7", "list of token ids"),
])
def test_decode_refuses_ids_outside_the_vocabulary(tok, ids, match):
    with pytest.raises(InvalidInput, match=match):
        decode_ids(tok, ids, vocab_size=30522)


def test_binary_types_equal_sentence_transformers():
    from sentence_transformers.util.quantization import quantize_embeddings

    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((7, 37)).astype(np.float32)  # 37: a last byte half full
    vecs[0, :5] = 0.0  # zero is not above 0
    for kind in ("binary", "ubinary"):
        got, want = quantize.quantize(vecs, kind), quantize_embeddings(vecs, precision=kind)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_base64_is_float32_little_endian():
    vecs = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32)
    got = quantize.quantize(vecs, "base64")
    assert [np.frombuffer(base64.b64decode(s), "<f4").tolist() for s in got] == vecs.tolist()


def test_int8_and_uint8_of_real_vectors_keep_their_direction(real_model):
    texts = ["How do I reset my password?", "Quarterly revenue rose by 12 percent.",
             "Die Katze schläft auf dem Sofa.", "def f(x): return x ** 2", "🙂 great trip to Lisbon"]
    vecs = real_model.encode(texts, normalize_embeddings=True)
    for kind in ("int8", "uint8"):
        codes = quantize.quantize(vecs, kind)
        back = quantize.dequantize(codes, kind)
        cos = (back * vecs).sum(1) / np.linalg.norm(back, axis=1)
        assert codes.dtype == np.dtype(kind) and cos.min() >= 0.99, (kind, cos)
        assert np.abs(back - vecs).max() <= 0.5 / quantize.INT8_SCALE + 1e-6
    assert quantize.quantize(np.array([[-1.0, 1.0, 0.0]]), "int8").tolist() == [[-127, 127, 0]]
    assert quantize.quantize(np.array([[-1.0, 1.0, 0.0]]), "uint8").tolist() == [[0, 255, 128]]


@pytest.mark.parametrize("value, match", [
    (["float", "int4"], r"'embedding_types\[1\]' is 'int4'; accepted values: float, int8, uint8, binary"),
    ([], "non-empty list"), ("float", "non-empty list"),
])
def test_embedding_types_are_checked(value, match):
    with pytest.raises(InvalidInput, match=match):
        quantize.check_embedding_types(value)


def test_input_types_map_to_the_models_prompts():
    prompts = {"query": "q: ", "passage": "p: ", "classification": "c: "}
    assert prompt_name_for("search_query", prompts) == "query"
    assert prompt_name_for("search_document", prompts) == "passage"
    assert prompt_name_for("clustering", prompts) is None  # no prompt for it: the text as it is
    assert prompt_name_for("search_query", {}) is None
    with pytest.raises(InvalidInput, match="accepted values: search_query, search_document"):
        prompt_name_for("image", prompts)
