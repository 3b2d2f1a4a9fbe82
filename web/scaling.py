"""Gunicorn workers that follow the load, between WEB_MIN_WORKERS and WEB_MAX_WORKERS.

Three parts, apart so that the decision can be tested without processes:

* :class:`BusyMeter`, in each worker: Gunicorn's ``pre_request`` and
  ``post_request`` hooks count the requests in progress and the
  request-nanoseconds spent, and the worker's client writes both into its
  ring's row of the control segment (layout: ``RING_DTYPE``).
* :class:`ScalePolicy`, pure: from the share of the workers' threads that were
  busy over the last second, the number of workers wanted (thresholds with
  hysteresis, bounds, and clocks that restart after every change).
* :class:`Scaler`, in the master: once a second, inside the arbiter's own
  ``manage_workers`` (no thread in the master, nothing left mapped across a
  fork), it maps the control segment read-only, reads its workers' rows,
  asks the policy and sets the arbiter's ``num_workers``. Gunicorn then
  spawns a worker, or retires the oldest with SIGTERM: it stops accepting,
  finishes its requests (WEB_GRACEFUL_TIMEOUT) and hands its ring back in
  ``worker_exit``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError, ShmEmbedError
from shm_protocol.region import Region
from shm_protocol.segments import Names

#: How often the master measures the load and decides (its loop wakes at least once a second).
TICK_S = 1.0


class BusyMeter:
    """A worker's requests in progress and request-nanoseconds spent,
    published through ``publish(inflight, busy_ns, at_ns)`` at every change
    (the client's ``publish_load``: a few stores into its ring's row)."""

    def __init__(self, publish: Callable[[int, int, int], None], clock: Callable[[], int] = time.monotonic_ns):
        self._publish = publish
        self._clock = clock
        self._lock = threading.Lock()
        self.inflight = 0
        self.busy_ns = 0
        self.at_ns = clock()

    def _change(self, step: int) -> None:
        with self._lock:
            now = self._clock()
            self.busy_ns += self.inflight * max(0, now - self.at_ns)
            self.at_ns = now
            self.inflight = max(0, self.inflight + step)
            self._publish(self.inflight, self.busy_ns, now)

    def begin(self) -> None:
        self._change(+1)

    def end(self) -> None:
        self._change(-1)


@dataclass
class ScalePolicy:
    """How many workers to run, from the share of their threads busy.

    Up: the share stays at or above ``up_busy`` for ``up_after_s``; the step
    brings the share back under ``up_busy`` if the load stayed as it is (at
    least one worker; a saturated share of 1.0 hides how much more is waiting,
    so the next step follows ``up_after_s`` later). Down: the share stays at or
    below ``down_busy`` for ``down_after_s``, and one worker fewer would still
    be under ``up_busy`` (so a removal never triggers an addition); one worker
    at a time. Each change restarts both clocks: the cool-down."""

    min_workers: int
    max_workers: int
    up_busy: float = 0.75
    down_busy: float = 0.25
    up_after_s: float = 2.0
    down_after_s: float = 60.0

    def __post_init__(self):
        if not 1 <= self.min_workers <= self.max_workers:
            raise ConfigError(f"workers: need 1 <= min ({self.min_workers}) <= max ({self.max_workers})")
        if not 0 <= self.down_busy < self.up_busy <= 1:
            raise ConfigError(f"busy thresholds: need 0 <= down ({self.down_busy}) < up ({self.up_busy}) <= 1")
        self._high_since: float | None = None
        self._low_since: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ScalePolicy:
        fewest, most = settings.worker_range
        return cls(fewest, most, settings.scale_up_busy, settings.scale_down_busy, settings.scale_up_after_s,
                   settings.scale_down_after_s)

    def decide(self, now: float, workers: int, busy: float) -> int:
        """The number of workers wanted at ``now`` (seconds, monotonic) for
        ``workers`` running whose threads were ``busy`` (0..1) lately."""
        busy = min(1.0, max(0.0, busy))
        wanted = min(self.max_workers, max(self.min_workers, workers))
        if wanted != workers:  # outside the bounds (an operator's TTIN or TTOU): back inside first
            return self._changed(wanted)
        if busy >= self.up_busy:
            self._low_since = None
            self._high_since = now if self._high_since is None else self._high_since
            if now - self._high_since >= self.up_after_s and workers < self.max_workers:
                step = max(1, math.ceil(workers * busy / self.up_busy) - workers)
                return self._changed(min(self.max_workers, workers + step))
            return workers
        self._high_since = None
        projected = busy * workers / (workers - 1) if workers > 1 else math.inf
        if busy <= self.down_busy and projected < self.up_busy and workers > self.min_workers:
            self._low_since = now if self._low_since is None else self._low_since
            if now - self._low_since >= self.down_after_s:
                return self._changed(workers - 1)
            return workers
        self._low_since = None
        return workers

    def _changed(self, workers: int) -> int:
        self._high_since = self._low_since = None
        return workers


@dataclass(frozen=True)
class RingLoad:
    """One worker's row, read by the master: ``busy_ns`` brought up to the reading's time."""

    pid: int
    lease: tuple  # (ring, claimed_ns): a new lease starts a new count
    busy_ns: int


def read_loads(names: Names, pids: set[int], now_ns: int) -> tuple[dict[int, RingLoad], int]:
    """The rows of the rings leased by ``pids`` and how many rings are free,
    mapping the control segment only for this call; ({}, 0) when no sidecar
    serves the namespace."""
    try:
        region = Region.attach(names, readonly=True, with_data=False)
    except ShmEmbedError:
        return {}, 0
    try:
        rows = region.rings.copy()
    finally:
        region.close()
    loads = {}
    for ring, row in enumerate(rows):
        pid = int(row["owner_pid"])
        if pid in pids:
            running = int(row["inflight"]) * max(0, now_ns - int(row["busy_at_ns"]))
            loads[pid] = RingLoad(pid, (ring, int(row["claimed_ns"])), int(row["busy_ns"]) + running)
    return loads, int((rows["owner_pid"] == 0).sum())


def busy_share(before: dict[int, RingLoad], after: dict[int, RingLoad], elapsed_ns: int, workers: int,
               threads: int) -> float:
    """The share of ``workers`` x ``threads`` that was busy between two
    readings; a worker without a ring, or with a new lease, counts as idle."""
    if elapsed_ns <= 0 or workers <= 0:
        return 0.0
    spent = 0
    for pid, now in after.items():
        then = before.get(pid)
        if then is not None and then.lease == now.lease:
            spent += max(0, now.busy_ns - then.busy_ns)
    return min(1.0, spent / (elapsed_ns * workers * max(1, threads)))


class Scaler:
    """The master's side: measures, decides and sets ``server.num_workers``
    from inside the arbiter's loop (see the module's docstring)."""

    def __init__(self, server, settings: Settings, clock: Callable[[], int] = time.monotonic_ns):
        self.server = server
        self.names = Names(settings.namespace)
        self.policy = ScalePolicy.from_settings(settings)
        self.threads = max(1, int(server.cfg.threads))
        self.clock = clock
        self._last_ns: int | None = None
        self._loads: dict[int, RingLoad] = {}
        self._warned_rings = False

    @classmethod
    def install(cls, server, settings: Settings) -> Scaler:
        """Run a tick before each of the arbiter's ``manage_workers``."""
        scaler = cls(server, settings)
        manage = server.manage_workers

        def manage_workers():
            scaler.tick()
            manage()

        server.manage_workers = manage_workers
        fewest, most = settings.worker_range
        server.log.info("workers scale with load between %d and %d", fewest, most)
        return scaler

    def tick(self) -> None:
        now = self.clock()
        # The arbiter's loop wakes about once a second: a tick due within a
        # tenth of it counts as due, or every other wake-up would be skipped.
        if self._last_ns is not None and now - self._last_ns < TICK_S * 0.9e9:
            return
        try:
            self._tick(now)
        except Exception:  # never let the scaler stop the arbiter's loop
            self.server.log.exception("worker scaling failed this time")

    def _tick(self, now: int) -> None:
        pids = set(self.server.WORKERS)
        loads, free_rings = read_loads(self.names, pids, now)
        if self._last_ns is None:
            self._last_ns, self._loads = now, loads
            return
        share = busy_share(self._loads, loads, now - self._last_ns, len(pids), self.threads)
        self._last_ns, self._loads = now, loads
        workers = self.server.num_workers
        wanted = self.policy.decide(now / 1e9, workers, share)
        if wanted > workers:
            # Workers beyond the free rings could not lease one (another
            # client holds them, or a dead worker's is not reaped yet).
            room = workers + free_rings
            if wanted > room and not self._warned_rings:
                self.server.log.warning("not adding workers beyond %d: no free ring of the sidecar", room)
                self._warned_rings = True
            wanted = max(workers, min(wanted, room))
        if wanted != workers:
            self.server.log.info("workers %d -> %d (threads busy: %.0f%%)", workers, wanted, share * 100)
            self.server.num_workers = wanted


def check_rings(settings: Settings) -> None:
    """Refuse a WEB_MAX_WORKERS that the sidecar's rings cannot all serve
    (each worker leases one): the configured SHM_EMBED_RINGS, and the rings
    of the sidecar serving the namespace now, if one does."""
    most = settings.worker_range[1]
    advice = "raise SHM_EMBED_RINGS (the sidecar's setting; restart it) or lower WEB_MAX_WORKERS"
    if settings.rings < most:
        raise ConfigError(f"WEB_MAX_WORKERS={most} workers need {most} rings, but SHM_EMBED_RINGS="
                          f"{settings.rings}: {advice}")
    try:
        region = Region.attach(Names(settings.namespace), readonly=True, with_data=False)
    except ShmEmbedError:
        return  # no sidecar yet: the configured count is all there is to check
    try:
        live = region.params.n_rings
    finally:
        region.close()
    if live < most:
        raise ConfigError(f"WEB_MAX_WORKERS={most} workers need {most} rings, but the sidecar serving "
                          f"{settings.namespace} has {live}: {advice}")
