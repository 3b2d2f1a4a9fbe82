"""Names, creation, attachment and removal of a namespace's POSIX objects.

The creator (the sidecar) unlinks; everyone else only closes. posix_ipc has
no resource tracker, so a worker that attaches never unlinks anything behind
the sidecar's back (multiprocessing.shared_memory's tracker would).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import mmap
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import posix_ipc
from loguru import logger

from .errors import ConfigError, NamespaceInUse, RingTableBusy, ShmEmbedError, ShmSpaceError, SidecarUnavailable

#: Where Linux shows POSIX shared memory and named semaphores.
DEV_SHM = Path("/dev/shm")


@dataclass(frozen=True)
class Names:
    """The POSIX names of one namespace's objects."""

    namespace: str

    @property
    def ctl(self) -> str:
        return f"/{self.namespace}-ctl"

    @property
    def data(self) -> str:
        return f"/{self.namespace}-data"

    @property
    def bell(self) -> str:
        return f"/{self.namespace}-bell"

    @property
    def bell_next(self) -> str:
        """Where a replacement doorbell is made before it is renamed over the old one."""
        return f"/{self.namespace}-bell-next"

    @property
    def cache(self) -> str:
        """The embedding cache segment (shm_protocol.cache)."""
        return f"/{self.namespace}-cache"

    @property
    def lock(self) -> str:
        return f"/{self.namespace}-lock"

    @property
    def takeover(self) -> str:
        """The lock a successor sidecar holds while it takes the namespace over (one at a time)."""
        return f"/{self.namespace}-next"

    def slot(self, ring: int, slot: int) -> str:
        return f"/{self.namespace}-s{ring}-{slot}"

    def owns_dev_shm_entry(self, entry: str) -> bool:
        """Whether a /dev/shm file name belongs to this namespace (and no other)."""
        ns = re.escape(self.namespace)
        return re.fullmatch(rf"(sem\.)?{ns}-(ctl|data|cache|bell|bell-next|lock|next|s\d+-\d+)", entry) is not None

    def dev_shm_entries(self) -> list[str]:
        """This namespace's objects now present in /dev/shm."""
        try:
            return sorted(e for e in os.listdir(DEV_SHM) if self.owns_dev_shm_entry(e))
        except FileNotFoundError:
            return []


def _apply_access(path: Path, mode: int, group: str) -> None:
    """Set mode and group on an object's /dev/shm file (sem_open and shm_open
    apply the umask, so the mode is set again explicitly)."""
    try:
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"SHM_EMBED_GROUP={group!r}: no such group") from None
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except FileNotFoundError:  # not Linux-style /dev/shm: the creation mode stands
        pass


class Segment:
    """One mapped shared-memory segment. Its fd is closed right after mmap,
    unless asked to keep it (the control segment: its ring-table lock lives
    on that descriptor)."""

    def __init__(self, name: str, mm: mmap.mmap, *, created: bool, fd: int = -1):
        self.name = name
        self.mm = mm
        self.created = created
        self.fd = fd  # kept open only where the segment is also locked (the control segment)

    @classmethod
    def create(cls, name: str, size: int, *, mode: int, group: str = "", keep_fd: bool = False) -> Segment:
        """Create a segment with every page allocated now. A sparse segment
        on a nearly full /dev/shm would be created fine and then kill the
        process with SIGBUS at the first write to a page tmpfs cannot supply;
        posix_fallocate turns that into ShmSpaceError at start-up."""
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        try:
            if group:
                os.fchown(shm.fd, -1, grp.getgrnam(group).gr_gid)
            os.fchmod(shm.fd, mode)
            try:
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise
                posix_ipc.unlink_shared_memory(name)
                raise space_error(size, name) from None
            mm = mmap.mmap(shm.fd, size)
            fd = os.dup(shm.fd) if keep_fd else -1
        finally:
            shm.close_fd()
        return cls(name, mm, created=True, fd=fd)

    @classmethod
    def attach(cls, name: str, *, readonly: bool = False, keep_fd: bool = False) -> Segment:
        try:
            shm = posix_ipc.SharedMemory(name, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise SidecarUnavailable(f"no segment {name}: is the sidecar running?", reason="absent") from None
        except posix_ipc.PermissionsError:
            raise SidecarUnavailable(f"segment {name} exists but this user may not open it",
                                     reason="permission") from None
        fd = -1
        try:
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(shm.fd, shm.size, prot=prot)
            if keep_fd:
                fd = os.dup(shm.fd)
        finally:
            shm.close_fd()
        return cls(name, mm, created=False, fd=fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.mm.close()
        except BufferError:
            # numpy views still point into the mapping; it is unmapped when they go.
            pass


#: What one named semaphore occupies in /dev/shm (a tmpfs page).
SEMAPHORE_BYTES = mmap.PAGESIZE


def shm_free_bytes() -> int:
    """Bytes an unprivileged process may still allocate in /dev/shm."""
    try:
        st = os.statvfs(DEV_SHM)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def space_error(needed: int, what: str = "this namespace") -> ShmSpaceError:
    """The error for a /dev/shm that cannot hold ``needed`` more bytes, naming both figures."""
    free = shm_free_bytes()
    return ShmSpaceError(
        f"{DEV_SHM} has {free:,} bytes free; {what} needs {needed:,} "
        "(enlarge /dev/shm, e.g. docker --shm-size, or lower SHM_EMBED_RINGS / SHM_EMBED_SLOT_TEXTS)",
        needed=needed, free=free,
    )


def check_shm_space(needed: int) -> None:
    """Raise ShmSpaceError unless ``needed`` bytes are free in /dev/shm."""
    if shm_free_bytes() < needed:
        raise space_error(needed)


def create_semaphore(name: str, initial: int, *, mode: int, group: str = "") -> posix_ipc.Semaphore:
    try:
        sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=initial)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise space_error(SEMAPHORE_BYTES, f"semaphore {name}") from None
        raise
    _apply_access(DEV_SHM / f"sem.{name.lstrip('/')}", mode, group)
    return sem


def reset_semaphore(sem, name: str, limit: int, *, mode: int, group: str = ""):
    """Empty a semaphore this process created: drain it when it holds fewer
    than ``limit`` posts; else someone wrote its value in /dev/shm (draining
    SEM_VALUE_MAX takes minutes), so unlink it and create a new one under
    the same name and mode. Returns the semaphore to use from now on (``sem``
    or the new one, which replaces and closes ``sem``). Only for a semaphore
    nobody opens meanwhile (a slot of a ring out of the pool): between the
    unlink and the create the name is absent. If the create fails, the name
    stays absent and the error is raised; calling again retries."""
    from . import hotpath

    if sem.drain(limit) < limit:
        return sem
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass
    made = create_semaphore(name, 0, mode=mode, group=group)
    try:
        new = hotpath.semaphore(name)  # the hot path's own handle, as for every slot (sidecar.server)
    finally:
        made.close()
    sem.close()
    return new


def unlink_namespace(names: Names, *, lock: bool = False) -> list[str]:
    """Remove every object of the namespace; return what was removed. The
    lifetime lock segment only with ``lock`` (its holder removes it itself;
    this is for cleaning up after a sidecar that was killed)."""
    removed = []
    fixed = [(names.ctl, posix_ipc.unlink_shared_memory), (names.data, posix_ipc.unlink_shared_memory),
             (names.cache, posix_ipc.unlink_shared_memory),
             (names.bell, posix_ipc.unlink_semaphore), (names.bell_next, posix_ipc.unlink_semaphore)]
    if lock:
        fixed += [(names.lock, posix_ipc.unlink_shared_memory), (names.takeover, posix_ipc.unlink_shared_memory)]
    slot_sems = [
        ("/" + e[len("sem."):], posix_ipc.unlink_semaphore)
        for e in names.dev_shm_entries()
        if e.startswith("sem.") and re.search(r"-s\d+-\d+$", e)
    ]
    for name, unlink in fixed + slot_sems:
        try:
            unlink(name)
            removed.append(name)
        except posix_ipc.ExistentialError:
            pass
    if removed:
        logger.debug("unlinked {} objects of namespace {}", len(removed), names.namespace)
    return removed


# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks).
_FLOCK = "hhqqi"


def try_lock(fd: int) -> bool:
    """Take an exclusive open-file-description lock on ``fd`` without waiting.

    Why an OFD lock, not a semaphore or lockf: the kernel drops it when the
    holder dies (a worker killed mid-lease never wedges the table), and it
    belongs to the open file, not the process, so two clients of one process
    exclude each other and closing some other descriptor of the same segment
    does not silently release it (both are true of lockf's POSIX locks)."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def unlock(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))


@contextlib.contextmanager
def locked(fd: int, timeout: float, what: str) -> Iterator[None]:
    """Hold the OFD lock on ``fd``, waiting at most ``timeout`` seconds for
    it (a holder that is stopped, SIGSTOP or a paused VM, keeps it until it
    runs again); RingTableBusy after that."""
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while not try_lock(fd):
        if time.monotonic() >= deadline:
            raise RingTableBusy(f"{what} stayed locked for {timeout:.1f}s (its holder is stopped or hung)")
        time.sleep(pause)
        pause = min(0.005, pause * 2)
    try:
        yield
    finally:
        unlock(fd)


class NamespaceLock:
    """The lock a sidecar holds on ``/NS-lock`` for its whole life, so two
    sidecars of one namespace can never both run, even started at once.

    The lock segment is unlinked on release; a starter that locked an inode
    which was unlinked meanwhile sees another inode under the name and
    tries again, so it never holds a lock nobody else can see."""

    def __init__(self, names: Names, *, mode: int, group: str = "", takeover: bool = False):
        """``takeover``: the successor's lock (``Names.takeover``) instead of the server's."""
        self.names = names
        self.path = path = names.takeover if takeover else names.lock
        self.fd = -1
        for _ in range(100):
            shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREAT, mode=mode)
            fd = os.dup(shm.fd)
            shm.close_fd()
            _apply_access(DEV_SHM / path.lstrip("/"), mode, group)
            if not try_lock(fd):
                os.close(fd)
                if takeover:
                    raise NamespaceInUse(f"another sidecar is already taking namespace {names.namespace!r} over "
                                         f"(it holds {path})")
                raise NamespaceInUse(
                    f"another sidecar already serves namespace {names.namespace!r} (it holds {path}); "
                    "stop it or set another SHM_EMBED_NAMESPACE"
                )
            try:
                same = os.stat(DEV_SHM / path.lstrip("/")).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)
        raise NamespaceInUse(f"the lock of namespace {names.namespace!r} keeps changing under us")

    def release(self) -> None:
        """Unlink the lock segment (still holding it), then drop the lock."""
        if self.fd < 0:
            return
        try:
            posix_ipc.unlink_shared_memory(self.path)
        except posix_ipc.ExistentialError:
            pass
        os.close(self.fd)
        self.fd = -1


def lock_is_held(path: str) -> bool:
    """Whether some process holds the OFD lock on segment ``path`` (a
    successor's takeover lock): False when nobody does or it does not exist."""
    try:
        shm = posix_ipc.SharedMemory(path)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return False
    fd = os.dup(shm.fd)
    shm.close_fd()
    try:
        if try_lock(fd):
            unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


def remove_unheld_lock(path: str) -> bool:
    """Unlink lock segment ``path`` if nobody holds it (a successor that
    died left its takeover lock behind): taken, unlinked while held, then
    let go, as :meth:`NamespaceLock.release` does, so a process that locks
    it meanwhile sees the name gone and tries again. True if removed."""
    try:
        shm = posix_ipc.SharedMemory(path)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return False
    fd = os.dup(shm.fd)
    shm.close_fd()
    try:
        if not try_lock(fd):
            return False  # held: a live successor's
        try:
            if os.stat(DEV_SHM / path.lstrip("/")).st_ino != os.fstat(fd).st_ino:
                return False  # replaced meanwhile by a new holder's
            posix_ipc.unlink_shared_memory(path)
        except (FileNotFoundError, posix_ipc.ExistentialError):
            return False
        return True
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2: stat.rindex(b")") + 3] not in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True


__all__ = [
    "DEV_SHM", "Names", "NamespaceLock", "Segment", "ShmEmbedError", "check_shm_space", "create_semaphore",
    "reset_semaphore", "unlink_namespace", "locked", "lock_is_held", "remove_unheld_lock", "try_lock",
    "unlock", "pid_alive",
]



#: owner_pid of a ring whose owner is known dead but whose slots the sidecar
#: has not reset yet (set from outside the sidecar, e.g. Gunicorn's child_exit).
ORPHANED = -1
