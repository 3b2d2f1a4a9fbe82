"""Property-based tests of every endpoint: whatever the body, a 2xx or a 4xx
JSON error, never a 500, and the sidecar keeps serving. The app runs
in-process (falcon's TestClient) against a real sidecar."""

from __future__ import annotations

import json

import falcon.testing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import client_for

PATHS = ["/v1/embeddings", "/embed"]
GET_PATHS = ["/health", "/ready", "/info", "/embedding/health", "/embedding/stats", "/metrics"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=50))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=5),
                                                         st.dictionaries(st.text(max_size=10), c, max_size=5)),
                          max_leaves=30)
texts = st.one_of(st.text(max_size=300), st.lists(st.text(max_size=100), max_size=8))
field_values = st.one_of(texts, json_value, st.lists(st.integers(-5, 40000), max_size=5))
bodies = st.one_of(
    st.fixed_dictionaries({"input": field_values}, optional={
        "model": json_value, "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), json_value),
        "dimensions": json_value}),
    st.fixed_dictionaries({"inputs": field_values}, optional={"normalize": json_value, "truncate": json_value}),
    json_value,
)


@pytest.fixture(scope="module")
def app_client(tiny_sidecar):
    from web.app import create_app

    settings = tiny_sidecar.settings.replace(max_inputs=16, max_input_chars=2000, max_body_bytes=20000)
    client = client_for(tiny_sidecar)
    app = create_app(client, settings)
    yield falcon.testing.TestClient(app)
    client.close()


def check(resp):
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        body = resp.json
        assert set(body) == {"error"} and isinstance(body["error"]["message"], str)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), body=bodies)
def test_random_json_bodies(app_client, path, body):
    check(app_client.simulate_post(path, body=json.dumps(body), headers={"content-type": "application/json"}))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=3000),
       ctype=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]))
def test_random_bytes_and_content_types(app_client, path, raw, ctype):
    headers = {"content-type": ctype} if ctype else {}
    check(app_client.simulate_post(path, body=raw, headers=headers))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(GET_PATHS + PATHS), method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
def test_other_methods(app_client, path, method):
    check(app_client.simulate_request(method, path))


def test_nul_invalid_utf8_huge_and_nested(app_client, tiny_sidecar):
    post = lambda body: app_client.simulate_post("/embed", body=body, headers={"content-type": "application/json"})  # noqa: E731
    assert post(json.dumps({"inputs": "a\u0000b"})).status_code == 422
    assert post(b'{"inputs": "\xff\xfe"}').status_code == 400
    assert post(json.dumps({"inputs": "x" * 30000})).status_code == 413
    assert post("[" * 5000 + "]" * 5000).status_code in (400, 422)
    assert post(json.dumps({"inputs": "\ud800"})).status_code == 422
    ok = post(json.dumps({"inputs": ["still serving"]}))
    assert ok.status_code == 200
    assert tiny_sidecar.proc.poll() is None


#: Every route's text fields, with the field to fill: a body template and the path of the field in it.
TEXT_FIELDS = [
    ("POST", "/embed", {"inputs": ["x"]}, ("inputs", 0)),
    ("POST", "/embed", {"inputs": "x", "prompt": "x"}, ("prompt",)),
    ("POST", "/v1/embeddings", {"input": "x", "model": "x"}, ("model",)),
    ("POST", "/rerank", {"query": "x", "texts": ["a"]}, ("query",)),
    ("POST", "/v1/rerank", {"query": "q", "documents": [{"text": "x"}]}, ("documents", 0, "text")),
    ("PUT", "/collections/fz", {"options": {"query_prompt": "x"}}, ("options", "query_prompt")),
    ("POST", "/collections/fz/documents", {"documents": [{"id": "x", "text": "t"}]}, ("documents", 0, "id")),
    ("POST", "/collections/fz/documents", {"documents": [{"text": "t", "url": "x"}]}, ("documents", 0, "url")),
    ("POST", "/collections/fz/documents", {"documents": [{"text": "t", "metadata": {"k": {"x": "x"}}}]},
     ("documents", 0, "metadata", "k", "x")),
    ("POST", "/collections/fz/search", {"query": "q", "filter": {"k": "x"}}, ("filter", "k")),
    ("POST", "/search/web", {"query": "q", "urls": ["x"]}, ("urls", 0)),
]
#: Any text, lone surrogates and NUL included.
any_char = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.just("\0"))
any_text = st.one_of(st.text(max_size=30), st.lists(any_char, max_size=12).map("".join))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(TEXT_FIELDS), text=any_text)
def test_any_text_in_any_field_is_answered(app_client, route, text):
    """Whatever text fills a field of any route (half characters and NUL
    among it), the answer is a 2xx or a 4xx, never a 500; broken text a 422."""
    method, path, template, field = route
    body = json.loads(json.dumps(template))
    *parents, last = field
    holder = body
    for step in parents:
        holder = holder[step]
    holder[last] = text
    r = app_client.simulate_request(method, path, body=json.dumps(body),
                                    headers={"content-type": "application/json"})
    check(r)
    if any(0xD800 <= ord(c) <= 0xDFFF or c == "\0" for c in text):
        assert r.status_code == 422, r.text
