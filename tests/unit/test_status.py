"""The status page and its JSON through the Falcon app around the fake
client, and the Grafana dashboard against the metrics /metrics exports."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re

import pytest
from falcon import testing

from shm_protocol.config import Settings
from shm_protocol.errors import SidecarUnavailable
from tests.helpers import REPO
from tests.unit.test_web_app import FakeClient
from web.app import create_app
from web.metrics import make_registry

FIGURES = ("throughput", "queue_depth", "batch_size", "latency", "rings", "models", "cache")


@pytest.fixture
def fake():
    return FakeClient()


def client_app(fake, tmp_path, **settings) -> testing.TestClient:
    return testing.TestClient(create_app(fake, Settings.from_env({}, data_dir=str(tmp_path / "data"), **settings)))


def test_page_is_self_contained_and_allows_only_its_own_script(fake, tmp_path):
    r = client_app(fake, tmp_path).simulate_get("/status")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert sorted(re.findall(r'data-chart="(\w+)"', page)) == sorted(FIGURES)
    assert not re.search(r"""(src|href)\s*=|https?://|@import|url\(""", page), "no external asset"
    policy = r.headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_json_has_the_figures_and_the_sidecar_state(fake, tmp_path):
    app = client_app(fake, tmp_path)
    doc = app.simulate_get("/status.json").json
    assert doc["sidecar"]["up"] is True and doc["sidecar"]["state"] == "ready"
    assert doc["sidecar"]["dtype"] == "float32" and doc["sidecar"]["device"] == "fake"
    assert set(doc["counters"]) >= {"texts", "requests", "batches"}
    assert len(doc["batch_size"]["counts"]) == len(doc["batch_size"]["bounds"]) + 1
    assert len(doc["compute_seconds"]["counts"]) == len(doc["compute_seconds"]["bounds"]) + 1
    assert {"queue_depth", "busy_slots", "rings_leased", "models", "time"} <= set(doc)
    assert "cache" not in doc
    fake.fail = SidecarUnavailable("gone", reason="absent")
    r = app.simulate_get("/status.json")
    assert r.status_code == 200
    assert r.json["sidecar"]["up"] is False and r.json["sidecar"]["state"] == "down"
    assert r.json["sidecar"]["reason"] and "counters" not in r.json


def test_json_passes_the_cache_figures_on_when_the_sidecar_runs_a_cache(fake, tmp_path):
    plain = fake.stats()
    figures = {"enabled": True, "hits": 7, "misses": 3}
    fake.stats = lambda: dataclasses.replace(plain, cache=figures)
    assert client_app(fake, tmp_path).simulate_get("/status.json").json["cache"] == figures


def test_status_needs_the_api_key(fake, tmp_path):
    app = client_app(fake, tmp_path, api_key="s3cret")
    for path in ("/status", "/status.json"):
        assert app.simulate_get(path).status_code == 401
        assert app.simulate_get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def exported_names() -> set[str]:
    """Every series name /metrics can export, from the collector itself."""
    registry = make_registry(FakeClient().stats, "test")
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ("",), "info": ("_info",)}[family.type]
        names.update(family.name + s for s in suffixes)
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le"}


def promql_metric_names(expr: str) -> set[str]:
    """The series an expression reads: its identifiers, less functions,
    keywords, label matchers, grouping labels and range durations."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def test_grafana_dashboard_reads_only_exported_metrics():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "shm-embed.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    exported = exported_names()
    assert "shm_embed_texts_total" in exported and "shm_embed_batch_size_bucket" in exported
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
    assert promql_metric_names("sum by (le) (rate(nope_bucket{a=\"b\"}[5m]))") == {"nope_bucket"}
