"""A snapshot generation's files on disk: proving they hold what was written,
and opening them so that nothing done to them later can crash a process.

**Checksums.** The builder records the size and an ``xxh3_128`` digest of
``index.faiss`` and ``ids.npy`` in ``meta.json``. Bytes flipped by the disk
or an ids file permuted at the same size pass every structural check, and
would then answer searches wrongly without a sign; the digest catches them.
Every open checks them (once per generation per process: about a tenth of a
second per GB from the page cache), and so does the builder before it takes
the newest generation for current. A file whose identity (device, inode,
size, mtime, ctime) was verified before in this process is not read again;
ctime cannot be set back by any tool, and a file changed less than ``RACY_S``
before its check is checked again next time, as a second write may share its
timestamp.

**Leases.** A mapped file truncated in place (``cp`` or ``rsync --inplace``
over a live data directory) kills every process that touches a page past the
new end (SIGBUS), and no check before a search closes that race. So a worker
maps a file only while it holds a read lease on it (``F_SETLEASE``): the
kernel makes any process that opens the file for writing, or truncates it,
wait until the lease holders let go (at most ``/proc/sys/fs/lease-break-time``,
45 s by default), and marks the lease as breaking meanwhile. A worker checks
its leases before each search (:meth:`SnapshotFile.intact`, one system call);
one that finds a lease breaking unmaps the generation first, then lets go, and
serves from the tables until a snapshot is usable again. Readers never break
a read lease, so the workers of a host still map one shared copy. Where the
system grants no lease (a file system without them, ``fs.leases-enable`` off,
a file of another owner), the files are read into private memory instead of
mapped: safe, at the cost of a copy per process.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import signal
import threading
import time
import weakref
from pathlib import Path

import faiss
import numpy as np
import xxhash
from loguru import logger

from shm_protocol.errors import ShmEmbedError

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.npy", "meta.json"
#: A binary snapshot's float vectors (float32, a row per passage in the index's row order), read for rescoring.
VECTORS_FILE = "vectors.npy"
#: 2: meta.json holds the collection's creation time (a collection id alone may come from another database).
#: 3: and the size and checksum of each file; older generations are rebuilt.
#: 4: the kind may be "binary" (an IndexBinaryFlat of sign bits, and vectors.npy); older generations are rebuilt.
FORMAT = 4
#: The kinds of snapshot.
KINDS = ("flat", "ivf", "binary")
#: The metadata's whole numbers.
_META_INTS = ("generation", "seq", "nlist", "ntotal", "trained_at")
#: The digest meta.json records for each file (xxh3_128: ten times blake2b's speed; not a defence against tampering).
DIGEST = "xxh3_128"
#: Bytes read per system call while computing a digest.
_READ_CHUNK = 8 << 20
#: A file changed less than this long before its check may change again within its timestamps' granularity.
RACY_S = 1.0
#: Files whose verification is remembered, at most.
_VERIFIED_MAX = 1024
#: The signal the kernel sends a lease holder when its lease breaks. SIGIO, its default, would end the
#: process; SIGURG is ignored unless handled, and the leases are polled instead.
_LEASE_SIGNAL = signal.SIGURG


class SnapshotError(ShmEmbedError):
    """A snapshot could not be built or opened; searches go on from the tables."""


class BuildBusy(SnapshotError):
    """Another builder of this host is building this collection's snapshot now."""


class SnapshotGone(SnapshotError):
    """The generation was removed between listing and opening it (a newer one exists)."""


class SnapshotUnusable(SnapshotError):
    """The generation's files do not hold what its metadata says (damaged, another collection)."""


class SnapshotChanging(SnapshotError):
    """Another process has the generation's files open for writing now: try again later."""


class CollectionGone(SnapshotError):
    """The collection was deleted while its snapshot was being built."""


def _digest_fd(fd: int) -> str:
    digest = xxhash.xxh3_128()
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    offset = 0
    while n_read := os.preadv(fd, [buf], offset):
        digest.update(view[:n_read])
        offset += n_read
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """What meta.json records of a file the builder wrote: its size and digest."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return {"size": os.fstat(fd).st_size, DIGEST: _digest_fd(fd)}
    finally:
        os.close(fd)


def check_record(record) -> None:
    """Raise SnapshotUnusable unless ``record`` is what :func:`file_record` makes."""
    if (not isinstance(record, dict) or not isinstance(record.get("size"), int)
            or not isinstance(record.get(DIGEST), str)):
        raise SnapshotUnusable(f"a file's record {record!r} has no size and {DIGEST} digest")


_verified: dict[tuple, tuple] = {}
_verified_lock = threading.Lock()


def verify(fd: int, path: Path, record: dict) -> None:
    """Raise SnapshotUnusable unless the open file ``fd`` has the size and digest of ``record``."""
    st = os.fstat(fd)
    if st.st_size != record["size"]:
        raise SnapshotUnusable(f"{path} holds {st.st_size} bytes, its metadata says {record['size']}")
    key = (st.st_dev, st.st_ino)
    identity = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, record[DIGEST])
    with _verified_lock:
        if _verified.get(key) == identity:
            return
    got = _digest_fd(fd)
    if got != record[DIGEST]:
        raise SnapshotUnusable(f"{path}: {DIGEST} checksum {got} does not match its metadata's {record[DIGEST]} "
                               "(the file was damaged or changed after it was written)")
    if time.time() - st.st_ctime > RACY_S:
        with _verified_lock:
            if len(_verified) >= _VERIFIED_MAX:
                _verified.clear()
            _verified[key] = identity


def read_verified(fd: int, path: Path, record: dict) -> bytearray:
    """The whole content of ``fd``, checked against ``record`` as read (what is checked is what is used)."""
    size = os.fstat(fd).st_size
    if size != record["size"]:
        raise SnapshotUnusable(f"{path} holds {size} bytes, its metadata says {record['size']}")
    data = bytearray(size)
    view, done = memoryview(data), 0
    while done < size and (n := os.preadv(fd, [view[done:]], done)):
        done += n
    got = xxhash.xxh3_128_hexdigest(data)
    if done != size or got != record[DIGEST]:
        raise SnapshotUnusable(f"{path}: {DIGEST} checksum {got} does not match its metadata's {record[DIGEST]} "
                               "(the file was damaged or changed after it was written)")
    return data


_lease_warned = False


class SnapshotFile:
    """One file of a generation, open read-only, under a read lease where the
    system grants one (``leased``): only then may it be mapped."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.leased = self._lease()
        except BaseException:
            os.close(self.fd)
            raise

    def _lease(self) -> bool:
        global _lease_warned
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):  # another process has it open for writing now
                raise SnapshotChanging(f"{self.path} is being written by another process") from None
            if not _lease_warned:
                _lease_warned = True
                logger.warning("snapshot files cannot be leased here ({}): each process reads them into memory "
                               "of its own instead of sharing one mapped copy (a local file system, "
                               "fs.leases-enable=1 and files owned by the service's user allow it)", exc)
            return False

    @property
    def mappable_path(self) -> str:
        """A path to this very inode (not to whatever the name points to by now)."""
        return f"/proc/self/fd/{self.fd}"

    def intact(self) -> bool:
        """False once another process wants to write or truncate the file (its lease is breaking or broken)."""
        if not self.leased or self.fd < 0:
            return self.fd >= 0
        try:
            return fcntl.fcntl(self.fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
        except OSError:
            return False

    def close(self) -> None:
        """Let go of the file (and its lease: a writer waiting for it goes on). Unmap it first."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def close_all(fd: int, files: list[SnapshotFile]) -> None:
    """Close a generation's folder and files (its finalizer)."""
    for f in files:
        f.close()
    os.close(fd)


def generation_stamp(path: Path, names: tuple[str, ...]) -> tuple:
    """What changes when anything writes, truncates or replaces the folder ``path`` or
    its files ``names`` (inode, size, mtime, ctime each; None for one missing)."""
    stamp = []
    for p in (path, *(path / name for name in names)):
        try:
            st = os.stat(p)
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except (FileNotFoundError, NotADirectoryError):
            stamp.append(None)
    return tuple(stamp)


def read_meta(path: Path, *, cid: int, dim: int, created: float) -> dict:
    """Generation ``path``'s metadata, checked to be a snapshot of this collection
    (SnapshotUnusable); OSError or ValueError when it cannot be read."""
    meta = json.loads((path / META_FILE).read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SnapshotUnusable(f"{path}: its metadata is not a snapshot's of format {FORMAT}")
    if (meta.get("cid") != cid or meta.get("dim") != dim or meta.get("created") != created
            or meta.get("kind") not in KINDS or not all(type(meta.get(k)) is int for k in _META_INTS)):
        shown = {k: v for k, v in meta.items() if k != "files"}
        raise SnapshotUnusable(f"{path}: {shown} is not a snapshot of collection {cid} ({dim} dimensions, "
                               f"created {created})")
    files = meta.get("files")
    for name in file_names(meta["kind"]):
        check_record(files.get(name) if isinstance(files, dict) else None)
    return meta


def file_names(kind: str) -> tuple[str, ...]:
    """The files a generation of this kind holds, besides its metadata (in the order they are opened)."""
    return (INDEX_FILE, IDS_FILE, VECTORS_FILE) if kind == "binary" else (INDEX_FILE, IDS_FILE)


class OpenGeneration:
    """One generation, opened read-only and memory-mapped (``index``, ``ids``,
    the metadata's numbers), its files checked against their checksums; held
    open (a shared flock on its folder, a read lease on each file) until
    :meth:`release` or until this object is garbage."""

    def __init__(self, path: Path, *, cid: int, dim: int, created: float):
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotGone(f"{path} was removed") from None
        except NotADirectoryError:
            raise SnapshotUnusable(f"{path} is a file, not a generation's folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SnapshotGone(f"{path} is being removed") from None
        self._files: list[SnapshotFile] = []
        self._release = weakref.finalize(self, close_all, fd, self._files)
        try:
            self._open(cid, dim, created)
        except SnapshotError:
            self._release()
            raise
        except FileNotFoundError as exc:
            removed = os.fstat(fd).st_nlink == 0  # the folder itself went (its collection was deleted)
            self._release()
            if removed:
                raise SnapshotGone(f"{path} was removed") from None
            raise SnapshotUnusable(f"{path}: {exc}") from None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
            self._release()
            raise SnapshotUnusable(f"{path}: {exc}") from None

    def _open(self, cid: int, dim: int, created: float) -> None:
        path = self.path
        meta = read_meta(path, cid=cid, dim=dim, created=created)
        self.generation, self.seq, self.kind = meta["generation"], meta["seq"], meta["kind"]
        self.nlist, self.ntotal, self.trained_at = meta["nlist"], meta["ntotal"], meta["trained_at"]
        self.dim = dim
        for name in file_names(self.kind):
            self._files.append(SnapshotFile(path / name))
        index_file, ids_file = self._files[:2]
        records = meta["files"]
        binary = self.kind == "binary"
        self.vectors = None
        if all(f.leased for f in self._files):
            # No process can change them while the leases hold: what is checked is what is mapped.
            for f in self._files:
                verify(f.fd, f.path, records[f.path.name])
            # An empty file cannot be mapped; an empty index has nothing to share.
            mapped = self.ntotal > 0
            self.ids = np.load(ids_file.mappable_path, mmap_mode="r" if mapped else None, allow_pickle=False)
            read = faiss.read_index_binary if binary else faiss.read_index
            self.index = read(index_file.mappable_path, faiss.IO_FLAG_MMAP_IFC if mapped else 0)
            if binary:  # only the rescored candidates' rows are ever read: the rest may stay on disk
                self.vectors = np.load(self._files[2].mappable_path, mmap_mode="r" if mapped else None,
                                       allow_pickle=False)
        else:  # unprotected, a mapping could be truncated under a search: a private copy, checked as read
            self.ids = np.load(io.BytesIO(read_verified(ids_file.fd, ids_file.path, records[IDS_FILE])),
                               allow_pickle=False)
            data = np.frombuffer(read_verified(index_file.fd, index_file.path, records[INDEX_FILE]), dtype=np.uint8)
            self.index = faiss.deserialize_index_binary(data) if binary else faiss.deserialize_index(data)
            if binary:
                vectors_file = self._files[2]
                self.vectors = np.load(io.BytesIO(read_verified(vectors_file.fd, vectors_file.path,
                                                                records[VECTORS_FILE])), allow_pickle=False)
        index = self.index
        if binary:
            if not isinstance(index, faiss.IndexBinaryFlat):
                raise SnapshotUnusable(f"{path}: its index is a {type(index).__name__}, its metadata says binary")
            if (self.vectors.dtype != np.float32 or self.vectors.shape != (self.ntotal, dim)):
                raise SnapshotUnusable(f"{path}: {VECTORS_FILE} holds {self.vectors.dtype} of shape "
                                       f"{self.vectors.shape}, the metadata says {self.ntotal} of {dim}")
        else:
            want = faiss.IndexFlat if self.kind == "flat" else faiss.IndexIVF
            if (not isinstance(index, want) or index.metric_type != faiss.METRIC_INNER_PRODUCT
                    or (self.kind == "ivf" and index.nlist != self.nlist)):
                raise SnapshotUnusable(f"{path}: its index is a {type(index).__name__}, its metadata says "
                                       f"{self.kind} ({self.nlist} lists)")
        if self.ids.dtype != np.int64 or self.ids.ndim != 1:
            raise SnapshotUnusable(f"{path}: {IDS_FILE} holds {self.ids.dtype} of shape {self.ids.shape}")
        if index.ntotal != self.ntotal or len(self.ids) != self.ntotal or index.d != dim:
            raise SnapshotUnusable(f"{path}: the index holds {index.ntotal} vectors of {index.d}, "
                                   f"the metadata says {self.ntotal} of {dim}")
        if not self.intact():
            raise SnapshotChanging(f"{path} is being written by another process")

    def intact(self) -> bool:
        """Whether no other process wants to write or truncate its files: as long
        as it is, searching the mapping is safe (one system call per file)."""
        return all(f.intact() for f in self._files)

    def release(self) -> None:
        """Unmap the files, then let go of them: a process waiting to write them
        goes on. Nothing may search this snapshot afterwards."""
        self.index = self.ids = self.vectors = None
        self._release()
