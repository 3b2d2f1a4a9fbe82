"""The store's location and secrets: which store a location selects, URLs
without their passwords, and settings that keep secrets out of their repr."""

from __future__ import annotations

import pytest

from retrieval.collections.database import ambiguous_url, is_postgres, redact, url_password, url_secrets
from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError


@pytest.mark.parametrize("url, shown, password", [
    ("postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x", "s3cret"),
    ("postgres://u:p%40ss@db/x?sslmode=require", "postgres://u:***@db/x?sslmode=require", "p@ss"),
    ("postgresql://u@db/x", "postgresql://u@db/x", None),
    ("postgresql://db/x", "postgresql://db/x", None),
    ("postgresql://db:5432/x", "postgresql://db:5432/x", None),
    ("postgresql:///x?host=/run/pg", "postgresql:///x?host=/run/pg", None),
    ("postgresql://:only@db/x", "postgresql://:***@db/x", "only"),
    # libpq reads up to the '@' before the first '/': '#' and '?' are the password's
    ("postgresql://u:Se#cret1@db/x", "postgresql://u:***@db/x", "Se#cret1"),
    ("postgresql://u:a?b=c@db:5432/x", "postgresql://u:***@db:5432/x", "a?b=c"),
    ("postgresql://u:x#y?z@db/x?sslmode=require", "postgresql://u:***@db/x?sslmode=require", "x#y?z"),
    # a password given as a parameter
    ("postgresql://u@db/x?password=Se-cret2", "postgresql://u:***@db/x", "Se-cret2"),
    ("postgresql://db/x?sslmode=require&password=p%23w&user=u", "postgresql://u:***@db/x?sslmode=require", "p#w"),
    ("postgresql://u:pw@db/x?sslpassword=key-secret", "postgresql://u:***@db/x", "pw"),
    ("postgresql://u:pw@[::1]:5432/x", "postgresql://u:***@[::1]:5432/x", "pw"),
])
def test_urls_are_shown_without_their_password(url, shown, password):
    assert redact(url) == shown and url_password(url) == password
    assert is_postgres(url) and not ambiguous_url(url)
    for secret in url_secrets(url):
        assert secret not in redact(url)


@pytest.mark.parametrize("url, secret", [
    ("postgresql://u:p@ss-word@db:5432/x", "p@ss-word"),  # libpq would take "ss-word@db" for the host
    ("postgresql://u:a/b-secret@db/x", "a/b-secret"),  # ... or "a" for a port and "b-secret@db" for a database
    ("postgresql://u:pw@db/x?nonsense", "pw"),  # libpq cannot read it at all
])
def test_a_url_libpq_would_misread_is_not_shown_at_all(url, secret):
    assert redact(url) == "postgresql://***"
    assert "ss-word" not in redact(url) and "b-secret" not in redact(url)
    assert any(secret in s for s in url_secrets(url))


def test_the_password_never_shows_in_errors_or_logs_in_any_form(monkeypatch):
    """A server that cannot be reached (no server here: a closed port), and URLs that
    cannot be used: the store's errors, /ready's reason and every log line are free of each secret."""
    from loguru import logger

    import retrieval.collections.postgres_db as pgdb
    from retrieval.collections.postgres_db import PostgresDatabase, store_status
    from retrieval.errors import StorageUnavailable
    from shm_protocol.logs import RateLimitedLog
    from tests.helpers import free_port

    for name in ("_unreachable_log", "_status_log"):  # every line, whatever other tests logged before
        monkeypatch.setattr(pgdb, name, RateLimitedLog(0.0))

    port = free_port()
    urls = {f"postgresql://someone:Se#cret-1@127.0.0.1:{port}/db": "Se#cret-1",
            f"postgresql://someone:a?secret-2@127.0.0.1:{port}/db": "a?secret-2",
            f"postgresql://someone@127.0.0.1:{port}/db?password=secret-3": "secret-3",
            f"postgresql://someone:p%40ss-4@127.0.0.1:{port}/db": "p@ss-4"}
    bad = {f"postgresql://someone:p@ss-5@127.0.0.1:{port}/db": "ss-5",
           f"postgresql://someone:pw-6%ZZ@127.0.0.1:{port}/db": "pw-6"}
    lines: list[str] = []
    texts: list[tuple[str, str]] = []
    sink = logger.add(lines.append, level="DEBUG", format="{message}")
    try:
        for url, secret in urls.items():
            with pytest.raises(StorageUnavailable) as caught:
                PostgresDatabase(url, timeout_s=1)
            texts += [(str(caught.value), secret), (store_status(url)[1], secret)]
        for url, secret in bad.items():
            with pytest.raises(ConfigError) as refused:
                PostgresDatabase(url, timeout_s=1)
            texts += [(str(refused.value), secret), (store_status(url)[1], secret)]
    finally:
        logger.remove(sink)
    assert lines and any("someone:***@127.0.0.1" in line for line in lines), lines
    for text, secret in texts:
        assert secret not in text and "secret" not in text, text
    for line in lines:
        assert all(s not in line for s in [*urls.values(), *bad.values()]), line


def test_a_location_selects_the_store():
    assert not is_postgres("/var/lib/shm-embed") and not is_postgres("./.data") and not is_postgres("mysql://x")


def test_the_collections_url_is_checked_and_kept_out_of_the_settings_repr():
    settings = Settings.from_env({"SHM_EMBED_COLLECTIONS_URL": "postgresql://u:pw-xyz@h/db",
                                  "SHM_EMBED_API_KEY": "key-xyz"})
    assert settings.collections_url == "postgresql://u:pw-xyz@h/db"
    assert "pw-xyz" not in repr(settings) and "key-xyz" not in repr(settings)
    assert Settings.from_env({}).collections_url == ""  # SQLite under SHM_EMBED_DATA_DIR
    with pytest.raises(ConfigError, match="SHM_EMBED_COLLECTIONS_URL"):
        Settings.from_env({"SHM_EMBED_COLLECTIONS_URL": "sqlite:///x.db"})
    with pytest.raises(ConfigError, match="SHM_EMBED_COLLECTIONS_POOL"):
        Settings.from_env({"SHM_EMBED_COLLECTIONS_POOL": "0"})
