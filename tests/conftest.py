"""Fixtures: real sidecar processes (tiny or real model) on unique namespaces,
and a throwaway PostgreSQL cluster (tests/postgres.py) for the collection
stores, with a fresh database per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from shm_protocol.segments import unlink_namespace
from tests.helpers import SidecarProc, start_sidecar, stop_and_check
from tests.postgres import STORES


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sidecar.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def cross_encoder_path(tmp_path_factory) -> Path:
    """The bundled weights with a fresh one-label head, saved as a CrossEncoder folder."""
    from sidecar.tiny import make_cross_encoder

    return make_cross_encoder(tmp_path_factory.mktemp("ce") / "minilm-reranker")


@pytest.fixture(scope="session")
def cross_encoder(cross_encoder_path):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_encoder_path), device="cpu")


@pytest.fixture(scope="session")
def classifier_path(tmp_path_factory) -> Path:
    """The bundled weights with a fresh three-label head, saved as a sequence-classification folder."""
    from sidecar.tiny import make_classifier

    return make_classifier(tmp_path_factory.mktemp("clf") / "minilm-classifier")


@pytest.fixture(scope="session")
def multi_label_classifier_path(classifier_path, tmp_path_factory) -> Path:
    """classifier_path's weights (linked), marked multi-label in its config.json (a sigmoid per label)."""
    from tests.helpers import linked_model_folder

    return linked_model_folder(classifier_path, tmp_path_factory.mktemp("clf-multi") / "minilm-multi-label",
                               "config.json", problem_type="multi_label_classification")


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    from shm_protocol.model_files import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def real_model(real_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(real_model_path), device="cpu")


@pytest.fixture(scope="session")
def tiny_st(tiny_model):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def tiny_sidecar(tiny_model, tmp_path_factory):
    """A sidecar serving the tiny model, shared by a test module."""
    sc = start_sidecar(tmp_path_factory.mktemp("sc"), str(tiny_model), SHM_EMBED_TORCH_THREADS="1")
    yield sc
    stop_and_check(sc)


def _sidecar_factory(tmp_path: Path, model: str | None, **defaults):
    """A context that starts sidecars on demand and stops (and checks) each after the test."""
    started: list[SidecarProc] = []

    def make(**extra) -> SidecarProc:
        ns = extra.pop("namespace", None)
        sc = start_sidecar(tmp_path, model, ns, **{**defaults, **extra})
        started.append(sc)
        return sc

    def cleanup() -> None:
        for sc in started:
            if sc.proc.poll() is None:
                stop_and_check(sc)
            else:
                unlink_namespace(sc.names, lock=True)

    return make, cleanup


@pytest.fixture
def fresh_tiny_sidecar(tiny_model, tmp_path):
    """A sidecar of the test's own (for tests that kill or stop it)."""
    make, cleanup = _sidecar_factory(tmp_path, str(tiny_model), SHM_EMBED_TORCH_THREADS="1")
    yield make
    cleanup()


@pytest.fixture
def synthetic_sidecar(tmp_path):
    """Start sidecars of the synthetic backend (no torch; each model call takes
    ``us`` microseconds with the CPU free); stopped and checked after the test."""
    make, cleanup = _sidecar_factory(tmp_path, None)
    yield lambda us=0, **extra: make(SHM_EMBED_SYNTHETIC_US=str(us), **extra)
    cleanup()


@pytest.fixture(scope="module")
def real_sidecar(tmp_path_factory):
    """A sidecar serving the bundled all-MiniLM-L6-v2."""
    sc = start_sidecar(tmp_path_factory.mktemp("sc-real"), None)
    yield sc
    stop_and_check(sc)




@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster of this test session (started on first use, removed at the end);
    skips, with the reason, where no server can be run."""
    from tests.postgres import make_cluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = make_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """The URL of a new, empty database of the session's cluster."""
    return pg_cluster.create_database()


@pytest.fixture(params=STORES)
def store_location(request, tmp_path) -> str:
    """Where a test's collection store lives: a data directory of its own
    (SQLite), or a database of its own on the session's cluster (PostgreSQL)."""
    if request.param == "sqlite":
        return str(tmp_path / "data")
    return request.getfixturevalue("pg_url")
