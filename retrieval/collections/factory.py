"""Which :class:`retrieval.collections.database.Database` a location means, and what
``/ready`` asks of it before the store is opened: a ``postgresql://`` URL is
the PostgreSQL store (:mod:`retrieval.collections.postgres_db`), anything else the
directory of the SQLite store (:mod:`retrieval.collections.sqlite_db`). Each store's
module is imported only when its kind is asked for, so checking a SQLite
store never imports psycopg."""

from __future__ import annotations

import os
from pathlib import Path

from shm_protocol.config import COLLECTIONS_DB

from .database import Database, is_postgres


def location_of(settings) -> str:
    """Where ``settings`` keep collections: the PostgreSQL URL, or the SQLite data directory."""
    return settings.collections_url or str(settings.data_dir)


def store_status(location: str | os.PathLike) -> tuple[bool, str]:
    """(True, "ok") when the store at ``location`` can be read or was never
    made; (False, reason) otherwise. Creates nothing; for ``/ready``."""
    if is_postgres(location):
        from .postgres_db import store_status as pg_status  # psycopg: imported only for a PostgreSQL store

        return pg_status(str(location))
    from .sqlite_db import store_status as sqlite_status

    return sqlite_status(Path(location) / COLLECTIONS_DB)


def store_exists(location: str | os.PathLike) -> bool:
    """Whether anything may be stored at ``location`` yet (a SQLite file is only
    made on first use; a PostgreSQL server always counts: its schema is the
    service's to create at start)."""
    if is_postgres(location):
        return True
    return (Path(location) / COLLECTIONS_DB).exists()


def open_database(location: str | os.PathLike, **options) -> Database:
    """The database at ``location``: a ``postgresql://`` URL, or a directory for SQLite."""
    if is_postgres(location):
        from .postgres_db import PostgresDatabase

        return PostgresDatabase(str(location), **{k: v for k, v in options.items() if k in PostgresDatabase.OPTIONS})
    from .sqlite_db import SQLiteDatabase

    return SQLiteDatabase(location, **{k: v for k, v in options.items() if k in SQLiteDatabase.OPTIONS})
