"""Names, creation, attachment and removal of a namespace's POSIX objects.

The creator (the sidecar) unlinks; everyone else only closes. posix_ipc has
no resource tracker, so a worker that attaches never unlinks anything behind
the sidecar's back (multiprocessing.shared_memory's tracker would).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import posix_ipc
from loguru import logger

from .errors import ConfigError, ShmEmbedError, SidecarUnavailable

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

    def slot(self, ring: int, slot: int) -> str:
        return f"/{self.namespace}-s{ring}-{slot}"

    def owns_dev_shm_entry(self, entry: str) -> bool:
        """Whether a /dev/shm file name belongs to this namespace (and no other)."""
        ns = re.escape(self.namespace)
        return re.fullmatch(rf"(sem\.)?{ns}-(ctl|data|bell|s\d+-\d+)", entry) is not None

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
    """One mapped shared-memory segment. Its fd is closed right after mmap."""

    def __init__(self, name: str, mm: mmap.mmap, *, created: bool):
        self.name = name
        self.mm = mm
        self.created = created

    @classmethod
    def create(cls, name: str, size: int, *, mode: int, group: str = "") -> "Segment":
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        try:
            if group:
                os.fchown(shm.fd, -1, grp.getgrnam(group).gr_gid)
            os.fchmod(shm.fd, mode)
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        return cls(name, mm, created=True)

    @classmethod
    def attach(cls, name: str, *, readonly: bool = False) -> "Segment":
        try:
            shm = posix_ipc.SharedMemory(name, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise SidecarUnavailable(f"no segment {name}: is the sidecar running?", reason="absent") from None
        except posix_ipc.PermissionsError:
            raise SidecarUnavailable(f"segment {name} exists but this user may not open it", reason="permission") from None
        try:
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(shm.fd, shm.size, prot=prot)
        finally:
            shm.close_fd()
        return cls(name, mm, created=False)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            # numpy views still point into the mapping; it is unmapped when they go.
            pass


def create_semaphore(name: str, initial: int, *, mode: int, group: str = "") -> posix_ipc.Semaphore:
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=initial)
    _apply_access(DEV_SHM / f"sem.{name.lstrip('/')}", mode, group)
    return sem


def open_semaphore(name: str) -> posix_ipc.Semaphore:
    try:
        return posix_ipc.Semaphore(name)
    except posix_ipc.ExistentialError:
        raise SidecarUnavailable(f"no semaphore {name}: the sidecar is gone", reason="absent") from None
    except posix_ipc.PermissionsError:
        raise SidecarUnavailable(f"semaphore {name} exists but this user may not open it", reason="permission") from None


def drain(sem: posix_ipc.Semaphore) -> int:
    """Take every pending post without blocking; return how many."""
    n = 0
    while True:
        try:
            sem.acquire(0)
        except posix_ipc.BusyError:
            return n
        n += 1


def unlink_namespace(names: Names) -> list[str]:
    """Remove every object of the namespace; return what was removed."""
    removed = []
    fixed = [(names.ctl, posix_ipc.unlink_shared_memory), (names.data, posix_ipc.unlink_shared_memory),
             (names.bell, posix_ipc.unlink_semaphore)]
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


@contextlib.contextmanager
def ring_table_lock(names: Names) -> Iterator[None]:
    """Exclusive lock over the ring table, held through an fcntl lock on the
    control segment. The kernel drops it if the holder dies, so a worker
    killed mid-lease can never wedge the table (a semaphore would stay taken)."""
    try:
        shm = posix_ipc.SharedMemory(names.ctl)
    except posix_ipc.ExistentialError:
        raise SidecarUnavailable(f"no segment {names.ctl}: is the sidecar running?", reason="absent") from None
    fd = shm.fd
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        shm.close_fd()


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
    "DEV_SHM", "Names", "Segment", "ShmEmbedError", "create_semaphore", "open_semaphore", "drain",
    "unlink_namespace", "ring_table_lock", "pid_alive",
]



#: owner_pid of a ring whose owner is known dead but whose slots the sidecar
#: has not reset yet (set from outside the sidecar, e.g. Gunicorn's child_exit).
ORPHANED = -1
