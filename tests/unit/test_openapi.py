"""The OpenAPI document and the interactive docs, in process (the fake client
of test_web_app): the document is valid OpenAPI 3.1, lists every route the
Falcon router serves, and says what the validator does; /docs loads only
files the app serves itself."""

from __future__ import annotations

import re
from urllib.parse import urljoin

import falcon
import jsonschema
import pytest
from falcon import inspect as falcon_inspect
from falcon import testing
from openapi_spec_validator import validate

from shm_protocol.config import Settings
from tests.unit.test_web_app import FakeClient
from web.app import create_app
from web.errors import UndeclaredRoute
from web.openapi import RouteTable
from web.schema import Passed


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the app, its test client, its document) around the fake client."""
    settings = Settings.from_env({}, data_dir=str(tmp_path_factory.mktemp("data")), max_inputs=5,
                                 max_input_chars=50, max_body_bytes=4096)
    app = create_app(FakeClient(), settings)
    http = testing.TestClient(app)
    r = http.simulate_get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return app, http, r.json


def operations(doc):
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            yield path, method, op


def test_the_document_has_the_settings_limits_and_one_error_shape(built):
    _, _, doc = built
    assert doc["openapi"].startswith("3.1")
    embed = doc["paths"]["/embed"]["post"]["requestBody"]["content"]["application/json"]
    inputs = embed["schema"]["properties"]["inputs"]
    many = inputs["oneOf"][1]  # SHM_EMBED_MAX_INPUTS and SHM_EMBED_MAX_INPUT_CHARS of this app
    assert many["maxItems"] == 5 and many["items"]["maxLength"] == 50
    assert doc["components"]["securitySchemes"]["apiKey"] == {**doc["components"]["securitySchemes"]["apiKey"],
                                                              "type": "http", "scheme": "bearer"}
    assert "security" not in doc  # no key configured: nothing asked
    for _, _, op in operations(doc):
        assert op["responses"]["500"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}


def test_every_route_the_router_serves_is_documented_and_nothing_else(built):
    app, _, doc = built
    served = {(route.path, method.method.lower()) for route in falcon_inspect.inspect_routes(app.falcon_app)
              for method in route.methods if not method.internal}
    documented = {(path, method) for path, method, _ in operations(doc)}
    assert len(served) >= 20 and served == documented


def test_a_route_without_a_declared_operation_is_refused():
    class Bare:
        def on_get(self, req, resp):
            resp.media = {}

    with pytest.raises(UndeclaredRoute, match="GET /bare"):
        RouteTable(falcon.App()).add("/bare", Bare())


def body_operations(doc):
    return [(path, method, op) for path, method, op in operations(doc) if "requestBody" in op]


def concrete(path: str, op: dict) -> str:
    for param in op.get("parameters", []):
        path = path.replace("{" + param["name"] + "}", param["example"])
    return path


def test_the_schema_and_the_validator_refuse_the_same_fields(built):
    """For every field of every body the code checks, a value of the wrong
    kind is refused by the document's schema and by the app (a 422 naming
    the field); leaving out a required one too. The example passes both."""
    app, http, doc = built
    checked = 0
    for path, method, op in body_operations(doc):
        content = op["requestBody"]["content"]["application/json"]
        schema, example = content["schema"], content["example"]
        jsonschema.validate(example, schema)
        fields = {f.name: f for f in next(e for e in app.routes.entries
                                          if (e[0], e[1].lower()) == (path, method))[2].body.fields}
        for name in schema["properties"]:
            if isinstance(fields[name].kind, Passed):  # checked by the store, below the web layer
                continue
            bad = {**example, name: {"no such": "field"}}
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, schema)
            r = http.simulate_request(method.upper(), concrete(path, op), json=bad)
            assert r.status_code == 422 and f"'{name}" in r.json["error"]["message"], (path, name, r.text)
            checked += 1
        for name in schema.get("required", []):
            rest = {k: v for k, v in example.items() if k != name}
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(rest, schema)
            r = http.simulate_request(method.upper(), concrete(path, op), json=rest)
            assert r.status_code == 422 and f"'{name}' is required" in r.json["error"]["message"], (path, r.text)
    assert checked >= 30


def test_the_document_is_valid_and_docs_load_only_local_assets_and_the_key_guards_the_api_not_the_docs(tmp_path):
    app = create_app(FakeClient(), Settings.from_env({}, api_key="s3cret", data_dir=str(tmp_path / "d")))
    http = testing.TestClient(app)
    assert http.simulate_post("/embed", json={"inputs": ["x"]}).status_code == 401
    assert http.simulate_get("/nowhere").status_code == 401  # unknown paths are not told apart without the key
    page = http.simulate_get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r'url: "([^"]+)"', page.text)
    assert len(refs) == 4, refs
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref  # this server, no CDN
        r = http.simulate_get(urljoin("/docs", ref))
        assert r.status_code == 200 and len(r.content) > 100, ref
    assert http.simulate_get("/docs/assets/../app.py").status_code in (401, 404)
    assert http.simulate_get("/docs/assets/index.html").status_code == 404
    doc = http.simulate_get("/openapi.json").json
    validate(doc)  # OpenAPI 3.1 (a few seconds: once, on the document with the most in it)
    assert doc["security"] == [{"apiKey": []}]
    opened = {(path, method) for path, method, op in operations(doc) if op.get("security") == []}
    assert opened == {("/health", "get"), ("/openapi.json", "get"), ("/docs", "get"), ("/docs/assets/{asset}", "get")}
    assert "401" in doc["paths"]["/embed"]["post"]["responses"]
