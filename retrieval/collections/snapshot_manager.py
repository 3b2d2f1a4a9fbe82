"""One copy of a collection's vectors per host: shared, memory-mapped index snapshots.

Without snapshots every worker process holds every collection's vectors in
its own FAISS index (1.5 GB per million passages, per worker). With them the
host keeps one copy, which its workers map.

**Modules.** The files of a generation (:mod:`.snapshot_disk`: folders,
writing, locks; :mod:`.snapshot_files`: checksums, leases, opening); what a
worker searches (:mod:`.snapshot_index`); this module, which decides which
generation a worker serves and when one is built, and builds it; and the
builder process (:mod:`.snapshot_builder`).

**Switching.** Before each search a worker stats the collection's folder (one
system call); when it changed (or changed less than ``RACY_S`` ago, within a
timestamp's granularity) it lists it again. A newer generation is opened and
the delta rebuilt from its sequence number on; the old one is unmapped when
the last search using it is done.

**Rebuilds** happen in a child process (``python -m retrieval.collections.snapshot_builder build``,
niced), started by a worker's background thread, never inside a request,
when the changes since the snapshot (delta plus hidden) reach
``SHM_EMBED_SNAPSHOT_DELTA``, when the worker replayed more than ``LOG_GROWTH``
times the collection's passages (and ``LOG_MIN``) since its snapshot (replaced
documents keep a small collection's delta small and its log growing: the build
is what compacts the log), when an ``auto``/``ivf`` collection reaches the
size at which it trains its IVF quantizer (the builder trains it, in place of
the write that crossed the size), or when it grew ``RETRAIN_GROWTH`` times
past the size its quantizer was trained at (the builder refits the centroids
to a sample of the whole collection; the number of lists stays, so that
``SHM_EMBED_SEARCH_NPROBE`` keeps trading the same recall for the same time).
A child rather than a thread: the build reads every vector (one more copy,
for its duration) and its memory goes back to the system when it exits. One
builder per host and collection: an ``flock`` on ``build.lock`` taken without
waiting (the kernel releases it when a builder dies). The builder reads the
passages and the last sequence number in one read transaction, so the
snapshot is exactly the state at that number.

**Old generations** are removed once no process has them open: a reader
holds a shared ``flock`` on the generation's folder for as long as it maps
it; a worker that switches to a newer generation, and every builder, remove
the older folders whose exclusive lock they get without waiting (one still
mapped then goes at the next switch or build). (Removing a mapped file would
be safe on Linux anyway: the mapping keeps the inode; the lock is about disk
space and tidiness.) A deleted collection's folder is removed by the store's
``delete`` at once, by a builder that finds its collection deleted during the
build (it then exits 0 without a mark), and by every build's sweep (in a
``finally``) for collections deleted by other hosts.

**Compaction.** The builder records, in ``snapshot_marks(host, cid, seq,
updated)``, the sequence number this host's newest snapshot covers; the host
is a random id kept in ``index/host`` (hostname plus random hex, so a copied
data directory on another host still needs its own file). It then deletes
the changes up to the smallest mark among the hosts that updated theirs within
``SHM_EMBED_SNAPSHOT_STALE_HOST_S`` (workers touch their host's mark every
quarter of that while they search) and raises ``change_floor(cid, seq)``
first. A worker whose applied sequence number is below the floor (a new
worker without a usable snapshot, a host that slept past the horizon, a
worker without snapshots) cannot replay what it missed: it reloads the
collection from the ``passages`` table in one read transaction (and asks for a
build), so compaction never makes it miss a change silently.

**Both stores.** Every statement is a method of the store's
:class:`retrieval.collections.database.Database` (SQLite or PostgreSQL); "one read
transaction" is its ``consistent()`` (a deferred transaction on SQLite's WAL,
``REPEATABLE READ, READ ONLY`` on PostgreSQL). With SQLite the host is the
only one. With PostgreSQL the hosts of one database each build their own
snapshots under their own data directory and record their own marks; times
of marks are the server's clock, so hosts whose clocks disagree still agree
on who is stale; compaction waits for every live host. A builder process
gets the store's URL (which may hold a password) in its environment
(``SHM_EMBED_COLLECTIONS_URL``), never on its command line.

Assumptions: one data directory per host on a local file system (flock and
rename semantics; not NFS); Linux (``/proc``, ``MAP_SHARED`` page sharing).
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from loguru import logger

from ..faiss_index import POINTS_PER_CENTROID, PassageIndex, binary_codes, ivf_need, nlist_for, train_centroids
from .snapshot_disk import (
    BUILD_DIR,
    GENERATION_FILES,
    build_lock,
    build_running,
    generation_dir,
    generations,
    host_id,
    index_root,
    private_dir,
    private_dirs,
    remove_unused,
    write_snapshot,
)
from .snapshot_files import (
    FORMAT,
    BuildBusy,
    CollectionGone,
    SnapshotChanging,
    SnapshotError,
    SnapshotGone,
    SnapshotUnusable,
    generation_stamp,
    read_meta,
)
from .snapshot_index import LayeredIndex, Snapshot, centroids_of, passages_of

#: Changes since its snapshot at which a worker asks for a rebuild, unless the settings say otherwise
#: (SHM_EMBED_SNAPSHOT_DELTA): what each worker holds of its own between rebuilds.
DELTA_MAX = 50_000
#: A host whose mark is older than this is not waited for by compaction (SHM_EMBED_SNAPSHOT_STALE_HOST_S): a week.
STALE_HOST_S = 7 * 86400.0
#: The IVF quantizer is refitted when the collection holds this many times the passages it was trained on.
RETRAIN_GROWTH = 4
#: Seconds a worker lets pass after a build attempt (its own, or one it found running) before it asks again;
#: doubled after each failed build, up to BUILD_BACKOFF_MAX_S.
BUILD_PAUSE_S = 5.0
BUILD_BACKOFF_MAX_S = 600.0
#: A folder modified less than this long ago may change again within its timestamp's granularity: list it again.
RACY_S = 1.0
#: Workers touch their host's mark this many times per stale-host horizon.
MARK_TOUCHES = 4
#: A worker asks for a build when it has replayed more than this many times the collection's live passages
#: (and more than LOG_MIN changes) since its snapshot: the build compacts the change log, which collections
#: below SHM_EMBED_SNAPSHOT_DELTA would otherwise keep forever, and which every new worker replays.
LOG_GROWTH = 4
LOG_MIN = 10_000
#: Changes deleted per transaction when compacting.
_COMPACT_CHUNK = 20_000
#: The builder's exit status when another builder holds the collection's lock.
EXIT_BUSY = 3
#: The variable that gives a builder process its PostgreSQL store (the setting of the same name).
LOCATION_ENV = "SHM_EMBED_COLLECTIONS_URL"
#: The module a builder process runs (named, not imported: it imports the store, which imports this module).
BUILDER_MODULE = "retrieval.collections.snapshot_builder"
_PROJECT = Path(__file__).resolve().parents[2]


def _fill(db, conn, cid: int, dim: int, centroids: np.ndarray | None, binary: bool = False) -> tuple:
    """(the FAISS index of every passage, what must stay alive with it, their ids in row order,
    their float vectors for a ``binary`` index, else None)."""
    holder = PassageIndex(dim, centroids) if centroids is not None else None  # holds the IVF's quantizer
    if binary:
        index = faiss.IndexBinaryFlat(dim)
    else:
        index = holder.index if holder is not None else faiss.IndexFlatIP(dim)
    chunks, floats = [], []
    for ids, vectors in passages_of(db, conn, cid, dim):
        if holder is not None:
            holder.add(ids, vectors)
        elif binary:
            index.add(binary_codes(vectors))
            floats.append(vectors)
        else:
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        chunks.append(ids)
    ids = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
    vectors = (np.concatenate(floats) if floats else np.empty((0, dim), np.float32)) if binary else None
    return index, holder, ids, vectors


def _covers(cdir: Path, gen: int, row, seq: int, kind: str, trained_at: int) -> bool:
    """Whether generation ``gen`` already is what a build now would write, and opens
    with every file matching its checksum (read only when the rest says it is current)."""
    path = generation_dir(cdir, gen)
    try:
        meta = read_meta(path, cid=row.cid, dim=row.dim, created=row.created)
    except (SnapshotError, OSError, ValueError):
        return False  # damaged, or removed: write a new one
    if (meta["seq"], meta["kind"], meta["trained_at"]) != (seq, kind, trained_at):
        return False
    try:
        Snapshot(path, cid=row.cid, dim=row.dim, created=row.created).release()
    except SnapshotError as exc:
        logger.warning("collection {}: snapshot generation {} is not kept: {}", row.name, gen, exc)
        return False
    return True


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the kernel: glibc keeps them, and a worker
    that dropped its own copy of a big index for a snapshot would go on holding it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- the manager: one per store, in each process ----------------------------------------


@dataclass
class _State:
    """What this process knows of one collection's snapshots."""

    dir_key: tuple | None = None  # (inode, mtime) of the folder when it was last listed
    newest: int | None = None
    #: (a generation found unusable: behind the log's floor, damaged; its files' stamp): not retried unless they change
    rejected: tuple | None = None
    queued: bool = False  # a build is asked for or running in this process
    proc: subprocess.Popen | None = None
    next_build: float = 0.0  # monotonic time before which no build is asked for
    failures: int = 0  # builds that failed in a row
    mark_due: float = 0.0  # monotonic time of the next touch of this host's mark


class SnapshotManager:
    """Snapshots of a store's collections: which one a worker serves, when a
    build is due (in a child process), and the building itself."""

    def __init__(self, store, data_dir: str | os.PathLike, *, delta_max: int = DELTA_MAX,
                 stale_host_s: float = STALE_HOST_S):
        self.store = store
        self.db = store.db
        #: This host's data directory (the builder's command line names it), and the SQLite store's: absolute,
        #: as the builder runs in the project's folder and this process may change its own later.
        self.data_dir = Path(data_dir).resolve()
        self._sqlite_dir = Path(self.db.dir).resolve() if self.db.kind == "sqlite" else None
        self.root = index_root(self.data_dir, self.db)
        self.delta_max = delta_max
        self.stale_host_s = stale_host_s
        self.build_pause_s = BUILD_PAUSE_S
        self.log_min = LOG_MIN
        self._lock = threading.Lock()
        self._states: dict[int, _State] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._host: str | None = None

    @property
    def host(self) -> str:
        if self._host is None:
            self._host = host_id(self.root)
        return self._host

    def collection_dir(self, cid: int) -> Path:
        return self.root / str(cid)

    def _state(self, cid: int) -> _State:
        with self._lock:
            return self._states.setdefault(cid, _State())

    # --- serving (called by the store under the collection's lock, in a read transaction) ---
    def _newest(self, cid: int, st: _State) -> int | None:
        cdir = self.collection_dir(cid)
        try:
            info = os.stat(cdir)
        except FileNotFoundError:
            st.dir_key = st.newest = None
            return None
        key = (info.st_ino, info.st_mtime_ns)
        if key != st.dir_key:
            st.newest = max(generations(cdir), default=None)
            st.dir_key = key if time.time() - info.st_mtime > RACY_S else None
        return st.newest

    def refresh(self, lo, floor: int, row, last: int | None = None) -> bool:
        """Serve ``lo`` (the store's per-collection state of collection ``row``)
        from the newest usable generation: a newer one replaces its index with
        a fresh layered index and sets its sequence number to the snapshot's,
        from where the store replays. Returns whether ``lo.index`` is a snapshot's now."""
        name = row.name
        st = self._state(lo.cid)
        layered = isinstance(lo.index, LayeredIndex)
        if layered and not lo.index.base.intact():
            self._let_go(lo, st, name)
            return False  # not opened again in this search: the writer that waited goes first
        newest = self._newest(lo.cid, st)
        if newest is None or (layered and lo.index.generation >= newest):
            return layered
        path = generation_dir(self.collection_dir(lo.cid), newest)
        stamp = generation_stamp(path, GENERATION_FILES)  # taken before opening: a change after it is seen next time
        if st.rejected == (newest, stamp):
            return layered
        try:
            snap = Snapshot(path, cid=lo.cid, dim=lo.dim, created=row.created)
        except (SnapshotGone, SnapshotChanging) as exc:
            st.dir_key = None  # list the folder again at the next search
            if isinstance(exc, SnapshotChanging):  # tried again, but a writer that never ends must not keep it away
                self.request_build(lo.cid, str(exc))
            return layered
        except SnapshotUnusable as exc:
            logger.error("collection {}: snapshot not used: {}", name, exc)
            st.rejected = (newest, stamp)  # tried again if its files change (a copy put back)
            self.request_build(lo.cid, f"generation {newest} is unusable")
            return layered
        if last is not None and snap.seq > max(last, floor):
            # The database is behind the snapshot: restored from a backup. Its state wins; a rebuild follows.
            logger.error("collection {}: snapshot generation {} covers the changes up to {}, but the database's "
                         "log ends at {} (restored from a backup?): reading the tables instead", name, newest,
                         snap.seq, max(last, floor))
            st.rejected = (newest, stamp)
            return layered
        if snap.seq < floor:
            logger.warning("collection {}: snapshot generation {} covers the changes up to {}, but the log was "
                           "compacted up to {}: reading the tables instead", name, newest, snap.seq, floor)
            st.rejected = (newest, stamp)
            return layered
        dropped = 0 if layered else lo.index.ntotal
        if (snap.kind == "binary") != (row.options.get("index") == "binary"):  # never written so: refused anyway
            logger.error("collection {}: snapshot generation {} is {}, the collection's index is {}", name,
                         newest, snap.kind, row.options.get("index"))
            st.rejected = (newest, stamp)
            snap.release()
            self.request_build(lo.cid, f"generation {newest} is of another kind")
            return layered
        # The old one's generation is released here.
        lo.index = LayeredIndex(snap, self.store.nprobe, row.options.get("rescore_multiplier"))
        lo.seq, lo.replayed = snap.seq, 0
        logger.info("collection {}: serving snapshot generation {} ({} passages, {}, changes up to {})",
                    name, newest, snap.ntotal, snap.kind, snap.seq)
        if dropped >= self.delta_max:
            _release_freed_memory()
        self._remove_unused(lo.cid, newest, name)
        return True

    def _let_go(self, lo, st: _State, name) -> None:
        """Stop serving a generation another process wants to write or truncate in
        place (its leases are breaking): unmapped before the writer may go on, so no
        search ever touches a page it truncated. The tables serve until a snapshot does."""
        snap = lo.index.base
        logger.error("collection {}: snapshot generation {} is being written or truncated in place by another "
                     "process: reading the tables instead (never overwrite a live data directory's snapshot files)",
                     name, snap.generation)
        lo.index, lo.seq = PassageIndex.for_options(lo.dim, lo.options, nprobe=self.store.nprobe), 0
        snap.release()
        st.dir_key = None
        self.request_build(lo.cid, f"generation {snap.generation} was changed in place")

    def _remove_unused(self, cid: int, newest: int, name) -> None:
        """Remove the generations older than ``newest`` that no process maps any more
        (a worker that switched away from one may have been its last reader)."""
        try:
            removed = remove_unused(self.collection_dir(cid), newest)
        except OSError as exc:  # a later switch or build tries again
            logger.warning("collection {}: unused snapshot generations not removed: {}", name, exc)
            return
        if removed:
            logger.info("collection {}: unused snapshot generations {} removed", name, removed)

    def remove_collection(self, cid: int) -> None:
        """Remove a deleted collection's snapshot folder. Safe while processes map its
        files: a mapping keeps its file's data until it is unmapped."""
        cdir = self.collection_dir(cid)
        if cdir.exists():
            shutil.rmtree(cdir, ignore_errors=True)
            logger.info("snapshots of deleted collection {} removed", cid)

    def after_sync(self, lo, options: dict) -> None:
        """Ask for a build when one is due (in the background), and keep this host's mark fresh."""
        index = lo.index
        layered = isinstance(index, LayeredIndex)
        why = None
        if (index.pending if layered else index.ntotal) >= self.delta_max:
            why = "changes since the snapshot" if layered else "no snapshot yet"
        elif index.kind == "flat":
            need = ivf_need(options, self.store.ivf_min_vectors)
            if need is not None and index.ntotal >= need:
                why = "the IVF quantizer is due"
        elif layered and index.kind == "ivf" and index.ntotal >= RETRAIN_GROWTH * max(1, index.base.trained_at):
            why = "the collection outgrew its quantizer"
        if why is None and lo.replayed > max(LOG_GROWTH * index.ntotal, self.log_min):
            # Replacements keep a collection small and its log growing: only a build (its mark) compacts the log.
            why = "the change log outgrew the collection"
        if why is not None:
            self.request_build(lo.cid, why)
        if layered:
            st = self._state(lo.cid)
            now = time.monotonic()
            if now >= st.mark_due:
                st.mark_due = now + self.stale_host_s / MARK_TOUCHES
                self._submit(lambda: self._touch_mark(lo.cid))

    # --- background work: one thread per process, one job at a time ---------------------
    def _submit(self, job) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run_jobs, name="shm-embed-snapshots", daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def _run_jobs(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except Exception as exc:  # a failed job only delays a build or a mark
                logger.warning("snapshots: background job failed: {}", exc)
            finally:
                self._jobs.task_done()

    def request_build(self, cid: int, why: str = "asked") -> None:
        """Build the collection's snapshot in a child process, in the background,
        unless this process has one asked for or a build ended less than ``build_pause_s`` ago."""
        st = self._state(cid)
        with self._lock:
            if st.queued or time.monotonic() < st.next_build or self._closed:
                return
            st.queued = True
        logger.debug("collection {}: snapshot build asked for ({})", cid, why)
        self._submit(lambda: self._build_in_child(cid, st))

    def build_command(self, cid: int) -> list[str]:
        """The command line of a builder process for collection ``cid``. It
        names this host's data directory; a PostgreSQL store's URL (which may
        hold a password) goes in the environment instead (:meth:`build_env`)."""
        store = self.store
        argv = [sys.executable, "-m", BUILDER_MODULE, "build", str(self.data_dir), str(cid),
                "--ivf-min-vectors", str(store.ivf_min_vectors), "--stale-host-s", str(self.stale_host_s),
                "--busy-timeout-s", str(store.busy_timeout_s), "--timeout-s", str(store.timeout_s)]
        if self._sqlite_dir is not None:
            argv += ["--sqlite-dir", str(self._sqlite_dir)]
        return argv

    def build_env(self) -> dict[str, str]:
        """The environment of a builder process: this one's, with the store's
        location in ``SHM_EMBED_COLLECTIONS_URL`` (PostgreSQL) or without it
        (SQLite: the command line names the directory)."""
        env = dict(os.environ)
        env.pop(LOCATION_ENV, None)
        if self.db.kind == "postgresql":
            env[LOCATION_ENV] = self.db.url
        return env

    def _build_in_child(self, cid: int, st: _State) -> None:
        failed = False
        try:
            if build_running(self.collection_dir(cid)):
                return  # another worker's builder is on it; its generation shows up at a later search
            with self._lock:
                if self._closed:
                    return
                # Its output goes to this process's stderr: a worker's stdout may be a protocol (tests).
                st.proc = subprocess.Popen(self.build_command(cid), cwd=_PROJECT, env=self.build_env(),
                                           stdin=subprocess.DEVNULL, stdout=sys.__stderr__.fileno())
            code = st.proc.wait()
            failed = code not in (0, EXIT_BUSY, -signal.SIGTERM)
            if failed:
                logger.warning("collection {}: snapshot builder exited with status {} (failure {} in a row)", cid,
                               code, st.failures + 1)
        except OSError as exc:
            failed = True
            logger.warning("collection {}: snapshot builder not started: {}", cid, exc)
        finally:
            with self._lock:
                st.proc = None
                st.queued = False
                st.failures = st.failures + 1 if failed else 0
                # A builder that keeps failing (a full or read-only disk) is not started again every few seconds.
                pause = min(self.build_pause_s * 2 ** st.failures, BUILD_BACKOFF_MAX_S)
                st.next_build = time.monotonic() + pause

    def join(self, timeout: float = 300.0) -> None:
        """Wait until the background jobs asked for so far are done (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._jobs.unfinished_tasks:
            raise TimeoutError(f"snapshot jobs still running after {timeout} s")

    def close(self) -> None:
        """Stop: builder processes this process started are terminated (a
        generation is whole or absent whenever a builder stops)."""
        with self._lock:
            self._closed = True
            procs = [st.proc for st in self._states.values() if st.proc is not None]
            thread = self._thread
            self._thread = None
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        if thread is not None:
            self._jobs.put(None)
            thread.join(10)

    # --- the mark, compaction, tidying ------------------------------------------------------
    def _touch_mark(self, cid: int) -> None:
        with self.db.write() as conn:
            self.db.touch_mark(conn, self.host, cid)

    def mark_and_compact(self, cid: int, seq: int, name: str = "") -> int:
        """Record that this host's snapshot covers the changes up to ``seq``;
        delete the changes every live host's snapshot covers. Returns how many."""
        db = self.db
        with db.write() as conn:
            if db.collection_by_id(conn, cid) is None:  # deleted meanwhile: no mark for it (nor a foreign-key error)
                raise CollectionGone(f"collection {cid} was deleted")
            db.mark_snapshot(conn, self.host, cid, seq)
            upto = db.covered_by_live_hosts(conn, cid, self.stale_host_s)
            floor = db.log_state(conn, cid)[1]
            if upto is None or upto <= floor:
                return 0
            # The floor first: a reader that sees changes missing sees the floor raised too.
            db.raise_floor(conn, cid, upto)
        deleted = 0
        while True:  # in slices: a SQLite transaction holds the write lock every writer waits for
            with db.write() as conn:
                n = db.delete_changes(conn, cid, upto, _COMPACT_CHUNK)
            deleted += n
            if n < _COMPACT_CHUNK:
                break
        logger.info("collection {}: change log compacted up to {} ({} changes deleted)", name or cid, upto, deleted)
        return deleted

    def sweep(self) -> list[int]:
        """Remove the snapshot folders of collections that no longer exist; returns their ids."""
        try:
            names = os.listdir(self.root)  # before the query: a folder is only made for an existing collection
        except FileNotFoundError:
            return []
        with self.db.read() as conn:
            live = self.db.collection_ids(conn)
        gone = [int(n) for n in names if n.isdigit() and int(n) not in live]
        for cid in gone:
            shutil.rmtree(self.collection_dir(cid), ignore_errors=True)
            logger.info("snapshots of deleted collection {} removed", cid)
        return gone

    # --- building ----------------------------------------------------------------------------
    def _quantizer(self, row, total: int) -> tuple[np.ndarray | None, int]:
        """The collection's IVF centroids and the passages they were trained at:
        trained now when due, refitted when the collection outgrew them."""
        db, cid, dim = self.db, row.cid, row.dim
        with db.read() as conn:
            centroids, trained_at = centroids_of(db, conn, cid, dim)
        need = ivf_need(row.options, self.store.ivf_min_vectors)
        if centroids is None and (need is None or total < need):
            return None, 0
        if centroids is not None and total < RETRAIN_GROWTH * max(1, trained_at):
            return centroids, trained_at
        nlist = nlist_for(total) if centroids is None else len(centroids)
        with db.read() as conn:
            blob = db.sample_vectors(conn, cid, min(total, nlist * POINTS_PER_CENTROID))
        sample = np.frombuffer(blob, dtype="<f4").reshape(-1, dim)
        t0 = time.perf_counter()
        fitted = train_centroids(sample, nlist).astype("<f4")
        with db.write() as conn:
            if centroids is None:
                db.add_centroids(conn, cid, fitted, total)
            else:
                db.replace_centroids(conn, cid, fitted, total)
        logger.info("collection {}: IVF quantizer of {} lists {} on {} passages in {:.1f} s", row.name,
                    len(fitted), "trained" if centroids is None else "refitted", len(sample),
                    time.perf_counter() - t0)
        with db.read() as conn:
            return centroids_of(db, conn, cid, dim)  # another process's training may have come first

    def build(self, cid: int) -> dict | None:
        """Write a new generation of collection ``cid`` from the tables (when
        anything changed since the newest), record the mark, compact the log,
        remove unused generations, and (whatever happened) the folders of
        deleted collections. Raises BuildBusy when another builder of this host
        holds the collection. Returns the new generation's metadata; None when
        the collection does not exist, or was deleted during the build (its
        folder is removed then)."""
        try:
            return self._build(cid)
        finally:
            try:
                self.sweep()
            except Exception as exc:  # the build's own outcome (or error) is what counts
                logger.warning("snapshots: sweep of deleted collections failed: {}", exc)

    def _exists(self, cid: int) -> bool:
        with self.db.read() as conn:
            return self.db.collection_by_id(conn, cid) is not None

    def _build(self, cid: int) -> dict | None:
        db = self.db
        with db.read() as conn:
            row = db.collection_by_id(conn, cid)
        if row is None:
            shutil.rmtree(self.collection_dir(cid), ignore_errors=True)
            return None
        cdir = self.collection_dir(cid)
        private_dirs(self.root)
        private_dir(cdir)
        try:
            with build_lock(cdir):
                return self._build_locked(cid, row, cdir)
        except BuildBusy:
            raise
        except Exception as exc:
            # Deleted during the build: its folder may be gone under the builder, or its mark refused.
            if not isinstance(exc, CollectionGone):
                try:
                    gone = not self._exists(cid)
                except Exception:  # the store cannot say: the build's own error is the one to report
                    gone = False
                if not gone:
                    raise
            shutil.rmtree(cdir, ignore_errors=True)
            logger.info("collection {} was deleted during its snapshot build: its snapshots removed", row.name)
            return None

    def _build_locked(self, cid: int, row, cdir: Path) -> dict | None:
        db = self.db
        t0 = time.perf_counter()
        shutil.rmtree(cdir / BUILD_DIR, ignore_errors=True)  # what a builder that died left
        gens = generations(cdir)
        with db.read() as conn:
            total = db.passage_count(conn, cid)
        centroids, trained_at = self._quantizer(row, total)
        binary = row.options.get("index") == "binary"
        kind = "binary" if binary else "flat" if centroids is None else "ivf"
        meta = None
        # The passages exactly as the changes up to seq left them.
        with db.read() as conn, db.consistent(conn, bulk=True):
            last, floor = db.log_state(conn, cid)
            seq = max(last, floor)
            current = bool(gens) and _covers(cdir, gens[-1], row, seq, kind, trained_at)
            if not current:
                index, keep, ids, vectors = _fill(db, conn, row.cid, row.dim, centroids, binary)
        if current:
            newest = gens[-1]
        else:
            newest = (gens[-1] if gens else 0) + 1
            meta = {"format": FORMAT, "generation": newest, "cid": cid, "created": row.created, "dim": row.dim,
                    "seq": seq, "kind": kind, "nlist": 0 if centroids is None else len(centroids),
                    "ntotal": int(index.ntotal), "trained_at": trained_at, "built": time.time()}
            write_snapshot(cdir, newest, index, ids, meta, vectors)
            del index, keep, ids, vectors
            logger.info("collection {}: snapshot generation {} written ({} passages, {}, changes up to {}) "
                        "in {:.1f} s", row.name, newest, meta["ntotal"], kind, seq, time.perf_counter() - t0)
        self.mark_and_compact(cid, seq, row.name)
        removed = remove_unused(cdir, newest)
        if removed:
            logger.info("collection {}: unused snapshot generations {} removed", row.name, removed)
        return meta
