"""Regression tests from a hostile review of the embedding cache and the
newer endpoints: each one failed before its fix. A tiny-model sidecar with
a cache, shared by the module."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shm_protocol import long_inputs
from shm_protocol.cache import KEY_WORDS, text_key
from shm_protocol.layout import cache_key_material
from tests.helpers import client_for, start_sidecar, stop_and_check


@pytest.fixture(scope="module")
def sidecar(tiny_model, tmp_path_factory):
    sc = start_sidecar(tmp_path_factory.mktemp("sc"), str(tiny_model), SHM_EMBED_TORCH_THREADS="1",
                       SHM_EMBED_CACHE_MB="1")
    yield sc
    stop_and_check(sc)


def victim_key(client, text: str) -> tuple[int, int, int, int]:
    """``text``'s cache key (default model, no prompt, default long-input policy)."""
    sess = client._get_session()
    policy = long_inputs.resolve_policy(None, None, None, client.settings.long_inputs)
    return text_key(cache_key_material(sess.models[0].name, sess.epoch, None, policy), text)


def entry_of(client, key: tuple) -> tuple[int, int]:
    """(bucket, way) of the cache entry of ``key``, once the sidecar has stored it."""
    cache = client._get_session().cache
    lo = key[0]
    bucket = lo % cache.geometry.n_buckets
    deadline = time.monotonic() + 2
    while lo not in (tags := cache._tags[bucket].tolist()) and time.monotonic() < deadline:
        time.sleep(0.005)  # the sidecar stores once it has answered
    return bucket, tags.index(lo)


def test_a_plain_submit_never_stores_its_vector_under_an_earlier_requests_key(sidecar):
    """Session.submit (the step-by-step API bench/hot_path.py uses) must not
    leave the slot's keys of an earlier embed_detailed behind: the sidecar
    would store this request's vector under another text's key, for every
    worker of the host."""
    victim, other = "the victim text", "a different text entirely"
    with client_for(sidecar) as c:
        reference = c.embed_detailed([victim]).vectors[0].copy()  # a miss: its keys are in a slot now
        sess = c._get_session()
        key = victim_key(c, victim)
        slot = int(np.flatnonzero((sess._key_words[:, :KEY_WORDS] == np.array(key, np.uint64)).all(axis=1))[0])
        # Damage the entry (the documented recovery: the next miss of its key rewrites it).
        bucket, way = entry_of(c, key)
        raw = sess.cache._raw
        vector_at = int(sess.cache.geometry.entry_dtype.fields["vector"][1])
        raw[bucket, way, vector_at] ^= 0xFF
        # Another text, sent step by step in the same slot.
        taken = [sess.take_slot(None) for _ in range(sess.params.slots_per_ring)]
        assert slot in taken
        for s in taken:
            if s != slot:
                sess.give_back(s)
        tok = c._tokenizers[0].tokenize_request([other], prompt=None, truncate=True, max_tokens=None)
        seq = sess.submit(slot, tok.ids[0], np.array([len(tok.ids[0])], np.int64))
        sess._await_answer(slot, seq)
        sess.give_back(slot)
        # The sidecar stores after it answers: give it a moment, then look the victim up.
        for _ in range(50):
            got = c.embed_detailed([victim])
            if got.slots_used == 0:
                break
        assert np.array_equal(got.vectors[0], reference), "another text's vector came back for the victim"


def test_openai_embeddings_follow_the_long_input_setting(sidecar):
    """/v1/embeddings names no long-input option, so SHM_EMBED_LONG_INPUTS
    decides, as it does for /embed: it cut every long input whatever the setting."""
    from falcon import testing

    from web.app import create_app

    long_text = "over the limit " * 200  # 600 tokens; the tiny model reads 256
    with client_for(sidecar, long_inputs="refuse") as c:
        app = testing.TestClient(create_app(c, c.settings))
        refused = app.simulate_post("/v1/embeddings", json={"input": [long_text]})
        assert refused.status_code == 413, refused.text
        assert "limit is 256" in refused.json["error"]["message"]
        assert app.simulate_post("/v1/embeddings", json={"input": ["short"]}).status_code == 200
    with client_for(sidecar, long_inputs="chunk") as c:
        app = testing.TestClient(create_app(c, c.settings))
        chunked = app.simulate_post("/v1/embeddings", json={"input": [long_text]})
        assert chunked.status_code == 200 and chunked.json["usage"]["total_tokens"] > 256


def test_cohere_output_dimension_errors_name_the_field(sidecar):
    """/v2/embed's refusals of output_dimension named 'dimensions', a field it does not have."""
    from falcon import testing

    from web.app import create_app

    with client_for(sidecar) as c:
        app = testing.TestClient(create_app(c, c.settings))
        dim = c.dimension
        for wanted, says in ((5, "not trained for truncation"), (dim + 1, f"gives 1 to {dim}"),
                             (2**70, f"gives 1 to {dim}")):
            r = app.simulate_post("/v2/embed", json={"texts": ["a"], "output_dimension": wanted})
            assert r.status_code == 422, r.text
            message = r.json["error"]["message"]
            assert message.startswith(f"'output_dimension' is {wanted}") and says in message, message
        same = app.simulate_post("/v2/embed", json={"texts": ["a"], "output_dimension": dim})
        assert same.status_code == 200 and len(same.json["embeddings"]["float"][0]) == dim
        unknown = app.simulate_post("/v2/embed", json={"texts": ["a"], "output_dimension": 5, "model": "nope"})
        assert unknown.status_code == 404
