"""Taking a namespace over from the sidecar that serves it: the successor's
side. The serving side is :meth:`sidecar.server.Sidecar.serve`, which drains
when asked. The sequence, and who writes what, is the layout's "Takeover"
(shm_protocol/layout.py): a successor has loaded its models before it asks,
so a load that fails never disturbs the serving sidecar.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from loguru import logger

from shm_protocol import hotpath
from shm_protocol.config import Settings
from shm_protocol.errors import LayoutMismatch, NamespaceInUse, SidecarUnavailable
from shm_protocol.layout import SidecarState
from shm_protocol.region import Region
from shm_protocol.segments import Names, NamespaceLock, pid_alive

from .errors import TakeoverFailed

#: How long a successor waits for the serving sidecar to drain and let go of
#: the namespace: its batch in flight (seconds on a CPU for a large one),
#: then answering what it holds.
HANDOVER_WAIT_S = 120.0

#: How often the successor looks at the serving sidecar's state meanwhile.
POLL_S = 0.002


def request_takeover(names: Names, settings: Settings) -> tuple[NamespaceLock, Region]:
    """Take the takeover lock, check a sidecar serves, ask it to hand the
    namespace over (``takeover_pid``) and wake it. Returns the lock and the
    serving sidecar's mapped control segment (kept until the handover)."""
    lock = NamespaceLock(names, mode=settings.ipc_mode, group=settings.group, takeover=True)
    try:
        try:
            region = Region.attach(names, with_data=False)
        except SidecarUnavailable as exc:
            raise TakeoverFailed(f"no sidecar serves namespace {names.namespace!r} to take over ({exc})") from None
        except LayoutMismatch as exc:
            raise TakeoverFailed(f"the serving sidecar speaks another protocol ({exc}); a takeover needs the "
                                 "same one: stop it and start this one instead") from None
        try:
            region.check_available(settings.stale_after_s, thorough=True)
        except SidecarUnavailable as exc:
            region.close()
            raise TakeoverFailed(f"the sidecar of namespace {names.namespace!r} does not serve now ({exc})") \
                from None
    except BaseException:
        lock.release()
        raise
    region.hv.takeover_pid[0] = os.getpid()
    try:
        bell = hotpath.semaphore(names.bell)
        bell.post()
        bell.close()
    except (OSError, SidecarUnavailable):
        pass  # the serving loop also looks at the request at least once per heartbeat interval
    logger.info("asked sidecar pid {} (epoch {:x}) to hand namespace {} over", region.sidecar_pid, region.epoch,
                names.namespace)
    return lock, region


def wait_for_handover(region: Region, create: Callable[[], None], timeout: float = HANDOVER_WAIT_S,
                      stopping: Callable[[], bool] = lambda: False, lock: NamespaceLock | None = None) -> None:
    """Wait until the serving sidecar has drained and let go (HANDED_OVER,
    or stopped, or dead), then ``create()`` the namespace anew as soon as
    its lock is free. TakeoverFailed if it refuses (clears the request) or
    does not let go within ``timeout``, or once ``stopping()`` (SIGTERM,
    Ctrl-C) before it has handed over: the request is withdrawn by letting
    go of the takeover ``lock`` while this process lives on (so workers
    keep waiting rather than failing), and a sidecar that drains for it
    goes back to serving; one that handed over already is taken over still
    (layout: Takeover)."""
    me = os.getpid()
    old_pid = region.sidecar_pid
    hv = region.hv
    deadline = time.monotonic() + timeout
    withdrawn = False
    while True:
        if not withdrawn and lock is not None and stopping():
            withdrawn = True
            lock.release()
            if int(hv.takeover_pid[0]) == me and int(hv.state[0]) == SidecarState.READY:
                hv.takeover_pid[0] = 0  # not seen yet (if it is meanwhile, it finds no lock held)
        state = int(hv.state[0])
        if int(hv.takeover_pid[0]) != me and state == SidecarState.READY:
            if withdrawn:
                raise TakeoverFailed(f"stopped before sidecar pid {old_pid} handed over; it serves on")
            raise TakeoverFailed(f"sidecar pid {old_pid} refused the takeover (another request replaced ours)")
        if state in (SidecarState.HANDED_OVER, SidecarState.STOPPED) or not pid_alive(old_pid):
            try:
                create()
                return
            except NamespaceInUse:
                pass  # it is unlinking its objects: the lock is free a moment later
        if time.monotonic() > deadline:
            if int(hv.takeover_pid[0]) == me and state == SidecarState.READY:
                hv.takeover_pid[0] = 0
            raise TakeoverFailed(f"sidecar pid {old_pid} did not hand the namespace over within {timeout:.0f}s "
                                 f"(state {region.state_name})")
        time.sleep(POLL_S)
