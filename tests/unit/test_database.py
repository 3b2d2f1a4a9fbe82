"""The store's location and secrets: which store a location selects, URLs
without their passwords, and settings that keep secrets out of their repr."""

from __future__ import annotations

import pytest

from retrieval.database import is_postgres, redact, url_password
from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError


@pytest.mark.parametrize("url, shown, password", [
    ("postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x", "s3cret"),
    ("postgres://u:p%40ss@db/x?sslmode=require", "postgres://u:***@db/x?sslmode=require", "p%40ss"),
    ("postgresql://u@db/x", "postgresql://u@db/x", None),
    ("postgresql://db/x", "postgresql://db/x", None),
    ("postgresql://db:5432/x", "postgresql://db:5432/x", None),
    ("postgresql:///x?host=/run/pg", "postgresql:///x?host=/run/pg", None),
    ("postgresql://:only@db/x", "postgresql://:***@db/x", "only"),
])
def test_urls_are_shown_without_their_password(url, shown, password):
    assert redact(url) == shown and url_password(url) == password
    assert is_postgres(url)


def test_a_location_selects_the_store():
    assert not is_postgres("/var/lib/shm-embed") and not is_postgres("./.data") and not is_postgres("mysql://x")


def test_the_collections_url_is_checked_and_kept_out_of_the_settings_repr():
    s = Settings.from_env({"SHM_EMBED_COLLECTIONS_URL": "postgresql://u:pw-xyz@h/db", "SHM_EMBED_API_KEY": "key-xyz"})
    assert s.collections_url == "postgresql://u:pw-xyz@h/db"
    assert "pw-xyz" not in repr(s) and "key-xyz" not in repr(s)
    assert Settings.from_env({}).collections_url == ""  # SQLite under SHM_EMBED_DATA_DIR
    with pytest.raises(ConfigError, match="SHM_EMBED_COLLECTIONS_URL"):
        Settings.from_env({"SHM_EMBED_COLLECTIONS_URL": "sqlite:///x.db"})
    with pytest.raises(ConfigError, match="SHM_EMBED_COLLECTIONS_POOL"):
        Settings.from_env({"SHM_EMBED_COLLECTIONS_POOL": "0"})
