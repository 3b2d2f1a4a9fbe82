"""The SQLite store's files and failures, without FAISS (the reasons a client
sees are shared with the PostgreSQL store).

- Files are private whatever the process's umask: the data directory is
  created 0700, the database 0600 before SQLite first opens it (SQLite then
  gives its ``-wal`` and ``-shm`` files the database's mode), and files an
  older version left readable by others are narrowed to 0600. ``make run``
  runs under the login umask (0022 here), which made them world-readable.
- A failure of the storage itself (a corrupt file, a full disk, an I/O error,
  a file that cannot be opened) becomes a typed :class:`StorageUnavailable`
  (HTTP 503) whose ``reason`` is all a client sees; the SQLite message and
  the path go to the log. Errors of the SQL itself are not storage failures
  and stay what they are.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path

from loguru import logger

from ..errors import StorageBusy, StorageUnavailable

FILE_MODE = 0o600
DIR_MODE = 0o700
#: The files SQLite keeps next to a WAL database.
SIDE_FILES = ("-wal", "-shm")

CORRUPT = "the database is corrupt"
FULL = "the disk is full"
IO = "the disk cannot be read or written"
CANNOT_OPEN = "the database cannot be opened"
#: (reason, Retry-After s) of a database whose schema is newer than this code knows.
NEWER = ("the database was migrated by a newer version of this service", 60)

#: SQLite's primary result codes -> (the reason a client sees, seconds to suggest in Retry-After).
#: A corrupt file or a full disk needs an operator, so clients are asked to come back later.
_REASONS = {
    sqlite3.SQLITE_CORRUPT: (CORRUPT, 60), sqlite3.SQLITE_NOTADB: (CORRUPT, 60),
    sqlite3.SQLITE_FULL: (FULL, 30), sqlite3.SQLITE_IOERR: (IO, 5),
    sqlite3.SQLITE_CANTOPEN: (CANNOT_OPEN, 30), sqlite3.SQLITE_PERM: (CANNOT_OPEN, 30),
    sqlite3.SQLITE_READONLY: (CANNOT_OPEN, 30), sqlite3.SQLITE_AUTH: (CANNOT_OPEN, 30),
}
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_OS_REASONS = {errno.ENOSPC: (FULL, 30), errno.EDQUOT: (FULL, 30), errno.EIO: (IO, 5)}
#: /ready is probed every few seconds: a store that stays broken is logged once a minute from there.


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes (SQLITE_IOERR_WRITE...) carry the primary below


def storage_error(exc: sqlite3.Error, path: Path | str, doing: str = "", *,
                  log: bool = True) -> StorageUnavailable | StorageBusy | None:
    """The typed error for a SQLite failure of the storage, logged with its
    details; None when ``exc`` is not one (a mistake in the SQL, a constraint)."""
    code = _code(exc)
    if code in _BUSY:
        return StorageBusy(f"collection store is busy: {exc}")
    if code not in _REASONS:
        return None
    reason, retry = _REASONS[code]
    if log:
        logger.error("collection store {}: {}{} ({})", path, f"{doing}: " if doing else "",
                     exc, getattr(exc, "sqlite_errorname", type(exc).__name__))
    return StorageUnavailable(f"collection store {path}: {exc}", reason=reason, retry_after_s=retry)


def os_storage_error(exc: OSError, path: Path | str) -> StorageUnavailable:
    """The typed error for a failure of the files around the database (the data directory, its modes)."""
    reason, retry = _OS_REASONS.get(exc.errno, (CANNOT_OPEN, 30))
    logger.error("collection store {}: {}", path, exc)
    return StorageUnavailable(f"collection store {path}: {exc}", reason=reason, retry_after_s=retry)


def prepare_files(db: Path) -> None:
    """Create the data directory (0700) and the database file (0600) unless
    they exist; narrow the modes of database files readable by others."""
    try:
        db.parent.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass  # an existing directory is the operator's: its mode is theirs
    else:
        os.chmod(db.parent, DIR_MODE)  # mkdir's mode went through the umask
    try:
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask could have taken bits away (0277)
        finally:
            os.close(fd)


def narrow_modes(db: Path) -> None:
    """Give the database and its side files mode 0600 where they have more
    (made by an older version under a loose umask). Only files of this user."""
    for path in (db, *(Path(f"{db}{suffix}") for suffix in SIDE_FILES)):
        try:
            st = os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(path, FILE_MODE)
                logger.warning("collection store: {} was mode {:o}; now {:o}", path, stat.S_IMODE(st.st_mode),
                               FILE_MODE)
        except FileNotFoundError:
            pass
