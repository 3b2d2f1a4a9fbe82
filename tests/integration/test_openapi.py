"""Every example request of the OpenAPI document succeeds against a real
service (Gunicorn in front of a synthetic sidecar serving an embedding
model, a reranker and a classifier, a local page server for web search),
and each answer has the shape the document gives it."""

from __future__ import annotations

import httpx
import jsonschema
import pytest

from tests.helpers import start_sidecar, start_web, stop_and_check
from tests.integration.test_web_retrieval import pages  # noqa: F401  (the fixture)

#: The order the examples run in: a collection is made before it is filled,
#: searched and read, and emptied before it is deleted.
PHASES = {"put": 0, "post": 1, "get": 2, "delete": 3}


@pytest.fixture(scope="module")
def service(tiny_model, cross_encoder_path, classifier_path, tmp_path_factory, pages):  # noqa: F811
    tmp = tmp_path_factory.mktemp("openapi")
    sc = start_sidecar(tmp, None, SHM_EMBED_SYNTHETIC_US="0",
                       SHM_EMBED_MODELS=f"all-MiniLM-L6-v2={tiny_model},reranker={cross_encoder_path},"
                                        f"classifier={classifier_path};classify")
    web = start_web(tmp, sc.env, workers=1, SHM_EMBED_FETCH_ALLOW="127.0.0.1", SHM_EMBED_SEARCH_URL=f"{pages}/search",
                    SHM_EMBED_FETCH_TIMEOUT_S="1", SHM_EMBED_API_KEY="s3cret")
    try:
        with httpx.Client(base_url=web.base, timeout=30, headers={"Authorization": "Bearer s3cret"}) as http:
            yield http, web.base
    finally:
        assert web.stop() == 0
        stop_and_check(sc)


def test_every_documented_example_succeeds_with_the_documented_shape(service):
    http, base = service
    doc = httpx.get(f"{base}/openapi.json").json()  # open, without the key
    assert doc["security"] == [{"apiKey": []}]
    calls = sorted(((method, path, op) for path, methods in doc["paths"].items() for method, op in methods.items()),
                   key=lambda c: (PHASES[c[0]], -len(c[1]) if c[0] == "delete" else 0, c[1]))
    for method, path, op in calls:
        url = path
        for param in op.get("parameters", []):
            url = url.replace("{" + param["name"] + "}", param["example"])
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
        r = http.request(method.upper(), url, json=body)
        assert 200 <= r.status_code < 300, (method, url, r.text)
        reply = op["responses"][str(r.status_code)]
        media_type, content = next(iter(reply["content"].items()))
        assert r.headers["content-type"].split(";")[0] == media_type.split(";")[0] or media_type.endswith(
            "octet-stream"), (url, r.headers["content-type"])
        if media_type == "application/json":
            jsonschema.validate(r.json(), content["schema"])
    assert len(calls) >= 20
    page = httpx.get(f"{base}/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
