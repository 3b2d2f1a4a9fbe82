"""A collection's snapshot folder on disk: where generations live, how one is
written whole, the build lock, and the removal of generations no process maps.
What a generation's files hold and how they are opened safely is
:mod:`retrieval.collections.snapshot_files`; the design of snapshots as a
whole is :mod:`retrieval.collections.snapshot_manager`.

**Files.** ``SHM_EMBED_DATA_DIR/index/<collection id>/g<generation>/`` holds
one generation (``index/pg-<hash>/...`` for a PostgreSQL store, see
:func:`index_root`): ``index.faiss`` (``IndexFlatIP``, or ``IndexIVFFlat``
with its quantizer, ids inside; ``IndexBinaryFlat`` of sign bits for a
``binary`` one), ``ids.npy`` (the passage ids it holds, sorted; for a flat
or binary index also the id of each row), for a binary index ``vectors.npy``
(the float vectors, a row each, read for rescoring) and ``meta.json`` (the
change-log sequence number it covers, the generation, the collection's id and
creation time, kind, lists, passages, when its quantizer was trained, the
size and checksum of each file: checked at every open, see
:mod:`retrieval.collections.snapshot_files`, as are the read leases that keep a file
overwritten in place from crashing the workers that map it).
Folders are 0700 and files 0600, like the database. A builder writes a
generation into ``.build/``, fsyncs every file and the folder, renames it to
``g<generation>`` and fsyncs the parent: a generation exists whole or not at
all, whenever the builder dies.

**Locks.** One builder per host and collection: an ``flock`` on
``build.lock`` taken without waiting (the kernel releases it when a builder
dies). A reader holds a shared ``flock`` on a generation's folder for as long
as it maps it; :func:`remove_unused` removes only the older folders whose
exclusive lock it gets without waiting.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from .snapshot_files import IDS_FILE, INDEX_FILE, META_FILE, VECTORS_FILE, BuildBusy, file_names, file_record
from .storage import DIR_MODE, FILE_MODE

#: The folder under SHM_EMBED_DATA_DIR that holds the snapshots, one folder per collection id.
INDEX_DIR = "index"
HOST_FILE = "host"
LOCK_FILE = "build.lock"
#: Where a builder writes a generation before renaming it to g<generation>.
BUILD_DIR = ".build"
#: The files of one generation (of any kind).
GENERATION_FILES = (META_FILE, INDEX_FILE, IDS_FILE, VECTORS_FILE)
_GENERATION = re.compile(r"g(\d{12})")


def private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # mkdir's mode went through the umask


def private_dirs(path: Path) -> None:
    """``path`` and its missing parents, each made 0700."""
    if not path.exists():
        private_dirs(path.parent)
        private_dir(path)


def index_root(data_dir: Path, db) -> Path:
    """Where this host keeps the snapshots of the store ``db``:
    ``<data_dir>/index`` for the SQLite store of that directory, a folder of
    its own under it for any other store (``pg-<hash of server and database>``),
    so that two stores used from one data directory never share collection
    folders (their collection ids are the same numbers)."""
    root = Path(data_dir) / INDEX_DIR
    if db.kind == "sqlite":
        if Path(db.dir).resolve() == Path(data_dir).resolve():
            return root
        where = str(Path(db.dir).resolve())
    else:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(db.url)  # the server and database, never the user or password
        where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
    prefix = "sqlite" if db.kind == "sqlite" else "pg"
    return root / f"{prefix}-{hashlib.sha256(where.encode()).hexdigest()[:16]}"


def _create(path: Path):
    """A new file of mode 0600 whatever the umask, open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def host_id(root: Path) -> str:
    """This host's id for snapshot marks, made once and kept in ``root/host``."""
    path = root / HOST_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    private_dirs(root)
    tmp = root / f".{HOST_FILE}.{os.getpid()}.{threading.get_ident()}"
    with _create(tmp) as f:
        f.write(f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}\n".encode())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # first one wins; a link never shows a half-written file
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


def generations(cdir: Path) -> list[int]:
    """The complete generations in a collection's folder, oldest first."""
    try:
        names = os.listdir(cdir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for name in names if (m := _GENERATION.fullmatch(name)))


def generation_dir(cdir: Path, gen: int) -> Path:
    return cdir / f"g{gen:012d}"


def write_snapshot(cdir: Path, gen: int, index, ids: np.ndarray, meta: dict,
                   vectors: np.ndarray | None = None) -> Path:
    """Write a generation whole: into ``.build``, fsynced, renamed, parent fsynced.
    A binary one (``meta["kind"]``) also writes ``vectors``, its float vectors."""
    tmp = cdir / BUILD_DIR
    tmp.mkdir(mode=DIR_MODE)
    os.chmod(tmp, DIR_MODE)
    _create(tmp / INDEX_FILE).close()  # FAISS (re)opens it with fopen("wb"), which keeps the mode
    if meta["kind"] == "binary":
        faiss.write_index_binary(index, str(tmp / INDEX_FILE))
        with _create(tmp / VECTORS_FILE) as out:
            np.save(out, np.ascontiguousarray(vectors, dtype="<f4"), allow_pickle=False)
    else:
        faiss.write_index(index, str(tmp / INDEX_FILE))
    with _create(tmp / IDS_FILE) as out:
        np.save(out, np.ascontiguousarray(ids, dtype="<i8"), allow_pickle=False)
    names = file_names(meta["kind"])
    meta = dict(meta, files={name: file_record(tmp / name) for name in names})
    with _create(tmp / META_FILE) as out:
        out.write(json.dumps(meta).encode())
    for name in (*names, META_FILE):
        _fsync(tmp / name)
    _fsync(tmp)
    final = generation_dir(cdir, gen)
    os.rename(tmp, final)
    _fsync(cdir)
    return final


@contextmanager
def build_lock(cdir: Path) -> Iterator[None]:
    """The collection's build lock, taken without waiting (BuildBusy)."""
    fd = os.open(cdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildBusy(f"{cdir}: another builder holds {LOCK_FILE}") from None
        yield
    finally:
        os.close(fd)  # releases the lock (as the kernel does for a builder that dies)


def build_running(cdir: Path) -> bool:
    """Whether a builder holds the collection's lock now."""
    try:
        fd = os.open(cdir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_unused(cdir: Path, keep: int) -> list[int]:
    """Remove the generations older than ``keep`` that no process has open; returns them."""
    removed = []
    for gen in generations(cdir):
        if gen >= keep:
            continue
        path = generation_dir(cdir, gen)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except NotADirectoryError:  # a stray file named like a generation: no process maps it
            path.unlink(missing_ok=True)
            removed.append(gen)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a worker still maps it; a later build removes it
        else:
            shutil.rmtree(path)
            removed.append(gen)
        finally:
            os.close(fd)
    return removed
