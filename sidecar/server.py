"""The sidecar's lifecycle: owns the namespace's objects and keeps the
batching loop running.

:class:`Sidecar` creates the namespace (lock, segments, semaphores), runs
the loop, drains and removes everything on stop. One thread runs the loop:
it waits for the doorbell, reaps the rings of dead workers and has the
:class:`sidecar.scheduler.Scheduler` serve one batch at a time (scan, plan,
validate, embed, answer), and publishes its progress; a second one writes
the heartbeat, which proves the process runs. A stopped process (SIGSTOP, a
paused VM) shows a stale heartbeat; a wedged loop (a hung model call, a
lock) shows a loop past its deadline. Either makes the sidecar unavailable
to every reader (see the layout's docstring for the rules).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np
from loguru import logger

from shm_protocol import hotpath
from shm_protocol.config import Settings
from shm_protocol.errors import LayoutMismatch, NamespaceInUse, SidecarUnavailable
from shm_protocol.layout import (
    MODEL_DTYPE,
    SLOT_CLAIMED,
    LayoutParams,
    ModelKind,
    RecordViews,
    SidecarState,
    SlotViews,
    WaitPolicy,
)
from shm_protocol.logs import RateLimitedLog
from shm_protocol.region import Region, wait_until_ready
from shm_protocol.segments import (
    SEMAPHORE_BYTES,
    Names,
    NamespaceLock,
    check_shm_space,
    create_semaphore,
    lock_is_held,
    pid_alive,
    remove_unheld_lock,
    unlink_namespace,
)

from .cache_writer import CacheWriter
from .scheduler import Scheduler

#: After a large model call (the scheduler's TRIM_AFTER_TOKENS) glibc keeps
#: hundreds of MB of its activations in the C heap. Once no work has come for
#: TRIM_IDLE_S, the loop hands the free pages back (malloc_trim: about 20 ms,
#: only when idle).
TRIM_IDLE_S = 0.05

#: How long a stopping sidecar waits for CLAIMED slots (a worker between
#: claiming a slot and marking it READY) to become READY and be answered.
DRAIN_CLAIMED_WAIT_S = 0.25

#: Exit status of a sidecar that gave up on its wedged loop (EX_SOFTWARE).
EXIT_WEDGED = 70

#: How long a sidecar that handed its namespace over waits for its
#: successor to serve before it exits (under systemd the successor must have
#: named itself the main process by then; see docs/takeover.md).
SUCCESSOR_WAIT_S = 60.0

#: How long a sidecar whose successor died after the handover waits for the
#: dead process's locks to be let go (its last threads exiting) before it
#: creates the namespace again.
REVIVE_WAIT_S = 2.0

#: The watchdog interval a successor started by systemd's ExecReload= assumes
#: (it feeds every quarter of it: every second): systemd gives WATCHDOG_USEC
#: to the main process only, and feeding more often than asked is harmless.
TAKEOVER_WATCHDOG_S = 4.0

#: Batches in a row that may fail (the model raising every time, e.g. a
#: poisoned CUDA context; or the loop itself raising) before the loop stops
#: publishing progress: it then counts as wedged, is reported unavailable and
#: restarted, instead of passing for healthy while it answers nothing.
FAILURES_BEFORE_WEDGED = 20


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def choose_wait_policy(setting: str, model_uses_cpu: bool, cores: int) -> WaitPolicy:
    """SPIN where a core is spare for polling (the model computes elsewhere,
    and there are 2 cores or more); PARK where torch needs every core."""
    if setting == "spin":
        return WaitPolicy.SPIN
    if setting == "park":
        return WaitPolicy.PARK
    return WaitPolicy.SPIN if not model_uses_cpu and cores >= 2 else WaitPolicy.PARK


def _watchdog_seconds() -> float:
    """systemd's watchdog interval for this process, or 0 when none is set."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


class Sidecar:
    """Creates the namespace, serves it until stopped, then removes it."""

    def __init__(self, settings: Settings, models, *, notify: Callable[[str], None] | None = None):
        """``models``: the loaded models (sidecar.model.load_models), default
        first; one model alone may be passed as itself."""
        self.settings = settings
        self.models = list(models) if isinstance(models, list | tuple) else [models]
        self.names = Names(settings.namespace)
        self.notify = notify or (lambda msg: None)
        self._stop = threading.Event()  # asked to stop (a signal)
        self._beat_stop = threading.Event()  # the heartbeat thread's end, at each removal of the namespace
        self._cores = cores = len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
        self.wait_policy = choose_wait_policy(
            settings.wait_policy, any(m.uses_cpu for m in self.models), cores)
        self._stall_ns = int(settings.loop_stall_s * 1e9)
        # The loop's deadline, kept here and only published: the heartbeat
        # thread must not trust a header field every worker can write.
        self._deadline_ns = 0
        self._failures = 0  # batches or loop rounds in a row that failed
        self._log_fault = RateLimitedLog()
        self._lock: NamespaceLock | None = None
        self.region: Region | None = None
        self.slot_views: SlotViews | None = None
        self._bell = None  # until create() hands it to the scheduler
        self.scheduler: Scheduler | None = None
        self.cache: CacheWriter | None = None
        self.epoch = 0
        self.successor = 0  # pid of the sidecar this one drains for (layout: Takeover)
        self._took_over = False

    # -- lifecycle --------------------------------------------------------------------
    def request_stop(self) -> None:
        """Safe from a signal handler: sets a flag, nothing else."""
        self._stop.set()

    def reap_stale_namespace(self) -> None:
        """Remove objects of a crashed earlier sidecar of this namespace. Runs
        with the namespace lock held, so no other sidecar is alive: whatever
        is there is stale (a pid check would only refuse to start when the
        crashed sidecar's pid has been reused by an unrelated process)."""
        removed = unlink_namespace(self.names)
        if removed:
            logger.warning("reaped {} stale objects of namespace {}", len(removed), self.names.namespace)

    def create(self) -> None:
        settings = self.settings
        infos = [m.info for m in self.models]
        entries = [info.entry(i) for i, info in enumerate(infos)]
        for e in entries:  # names and paths must fit the table: ConfigError before anything is created
            e.write(np.zeros((), MODEL_DTYPE))
        # The slots are sized for the largest of every model.
        params = LayoutParams(
            n_rings=settings.rings,
            slots_per_ring=settings.slots_per_ring,
            max_texts=settings.slot_texts,
            max_tokens=max(settings.slot_tokens, *(i.max_seq_length for i in infos)),
            dim=max(i.dim for i in infos),
            max_seq_length=max(i.max_seq_length for i in infos),
            vocab_size=max(i.vocab_size for i in infos),
        )
        self._lock = NamespaceLock(self.names, mode=settings.ipc_mode, group=settings.group)
        try:
            self.reap_stale_namespace()
            n_sems = 1 + params.n_rings * params.slots_per_ring
            check_shm_space(params.ctl_bytes + params.data_bytes + n_sems * SEMAPHORE_BYTES)
            self.region = region = Region.create(self.names, params, mode=settings.ipc_mode, group=settings.group)
            self._bell = create_semaphore(self.names.bell, 0, mode=settings.ipc_mode, group=settings.group)
            sems = [
                [create_semaphore(self.names.slot(r, k), 0, mode=settings.ipc_mode, group=settings.group)
                 for k in range(params.slots_per_ring)]
                for r in range(params.n_rings)
            ]
        except BaseException:
            self.destroy()
            raise
        # posix_ipc made them (mode, group); the hot path posts and waits on handles of its own.
        made = [self._bell, *(sem for ring in sems for sem in ring)]
        try:
            handles = [hotpath.semaphore(sem.name) for sem in made]
        except BaseException:
            self._bell = None
            for sem in made:
                sem.close()
            self.destroy()
            raise
        for sem in made:
            sem.close()
        self._bell, self.flat_sems = handles[0], handles[1:]
        self.params = params
        header = region.header
        region.write_models(entries)
        region.set_text_field("device", infos[0].device)
        header["max_batch_tokens"] = settings.admit_tokens  # the admission budget (SHM_EMBED_ADMIT_TOKENS)
        header["max_batch_texts"] = settings.max_batch_texts
        header["wait_policy"] = self.wait_policy
        header["sidecar_pid"] = os.getpid()
        self.epoch = int.from_bytes(os.urandom(8), "little") >> 1 | 1
        header["epoch"] = self.epoch
        region.epoch = self.epoch
        embed_dims = [i.dim for i in infos if i.kind == ModelKind.EMBED]
        try:
            self.cache = CacheWriter.create(self.names, settings, n_rings=params.n_rings,
                                            dim=max(embed_dims, default=0), epoch=self.epoch)
        except BaseException:
            self.destroy()
            raise
        header["started_ns"] = time.time_ns()
        header["heartbeat_ns"] = time.monotonic_ns()
        self.slot_views = SlotViews(region.slots.reshape(-1))
        self.counters = RecordViews(header["stats"])  # the hot path's counters, a view each
        self.hv = RecordViews(header)
        self.scheduler = Scheduler(
            settings, self.models, params, region, self.names,
            slot_views=self.slot_views, counters=self.counters, bell=self._bell, flat_sems=self.flat_sems,
            cores=self._cores,
            progress=self._progress, model_outcome=self._model_outcome, log_fault=self._log_fault,
            cache=self.cache,
        )
        self._bell = None  # the scheduler's from here on: it replaces a tampered doorbell
        self._progress()
        header["state"] = SidecarState.READY  # last: workers may attach from here on
        mb = (params.ctl_bytes + params.data_bytes) / 2**20
        logger.info(
            "serving namespace {} epoch {:x}: {} rings x {} slots ({} texts / {} tokens each), {:.1f} MiB, "
            "waiting policy {}",
            self.names.namespace, self.epoch, params.n_rings, params.slots_per_ring,
            params.max_texts, params.max_tokens, mb, self.wait_policy.name.lower(),
        )

    def destroy(self) -> None:
        """Unlink what this sidecar created (only if the namespace is still
        its own epoch), unmap, and release the namespace lock."""
        for sem in getattr(self, "flat_sems", []):
            sem.close()
        self.flat_sems = []
        bell = self.scheduler.bell if self.scheduler is not None else self._bell
        if bell is not None:
            bell.close()
        self._unlink_own()
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.region is not None:
            self.slot_views = self.counters = self.hv = self.scheduler = None  # its views too: the mappings can go
            self.region.close()
            self.region = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _unlink_own(self) -> None:
        """Unlink the namespace's objects, if they are still of this
        sidecar's epoch (without the namespace lock, nothing there is ours)."""
        if self._lock is None:
            return
        if self._namespace_is_ours():
            unlink_namespace(self.names)
            remove_unheld_lock(self.names.takeover)  # a dead successor's; a live one's is left to it
        else:
            logger.warning("namespace {} now belongs to another epoch; leaving its objects", self.names.namespace)

    def _namespace_is_ours(self) -> bool:
        try:
            current = Region.attach(self.names, readonly=True, with_data=False)
        except (SidecarUnavailable, LayoutMismatch):
            return True  # absent or half-created: what is there is ours (we hold the lock)
        try:
            return current.epoch in (self.epoch, 0)
        finally:
            current.close()

    def serve(self, *, takeover: bool = False) -> None:
        """Create the namespace (``takeover``: from the sidecar serving it,
        once it has drained), run until stopped or taken over, drain, remove
        everything."""
        if takeover:
            from .takeover import request_takeover, wait_for_handover

            def create() -> None:
                # NOTE: the unit's main process from here, before the header
                # says READY: the old sidecar exits once it sees READY, and
                # systemd must know its successor by then.
                if not self._took_over:
                    self.notify(f"MAINPID={os.getpid()}")
                    self._took_over = True
                self.create()

            lock, old = request_takeover(self.names, self.settings)
            try:
                wait_for_handover(old, create, stopping=self._stop.is_set, lock=lock)
            finally:
                old.close()
                lock.release()
        else:
            self.create()
        self.notify("READY=1")
        while self._serve_epoch():
            pass

    def _serve_epoch(self) -> bool:
        """Serve the created namespace until stopped or taken over, drain,
        remove everything. True when this sidecar has created the namespace
        again (its successor died after the handover): serve that too."""
        self._beat_stop.clear()
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        try:
            while True:
                self._loop()
                if self._drain():
                    break
            for line in self.scheduler.call_sizes():
                logger.info("texts per call learnt: {}", line)
        finally:
            self._beat_stop.set()
            hb.join(timeout=2)
            if self.region is not None and not self.successor:
                self.region.header["state"] = SidecarState.STOPPED
            self.destroy()
            if not self.successor:
                logger.info("stopped; namespace {} removed", self.names.namespace)
        return bool(self.successor) and not self._await_successor() and self._revive()

    def _accept_takeover(self) -> bool:
        """A successor asks for the namespace (``takeover_pid``): accept it if
        it is a live process holding the takeover lock, else clear the field
        (any process that may write the header could have written it)."""
        pid = int(self.hv.takeover_pid[0])
        if pid != os.getpid() and pid_alive(pid) and lock_is_held(self.names.takeover):
            logger.info("sidecar pid {} takes namespace {} over: draining", pid, self.names.namespace)
            self.successor = pid
            return True
        self.hv.takeover_pid[0] = 0
        self._log_fault("WARNING", "ignored a takeover request naming pid {} (no live successor holding {})",
                        pid, self.names.takeover)
        remove_unheld_lock(self.names.takeover)
        return False

    def _await_successor(self) -> bool:
        """The namespace is handed over: wait (bounded) for the successor to
        serve it, so that this process exits only after it. False when it
        died or did not serve in time."""
        pid = self.successor
        if wait_until_ready(self.names, pid, SUCCESSOR_WAIT_S, alive=lambda: pid_alive(pid)) \
                or self._serves(pid):  # it served, then died: its own crash, not the handover's
            logger.info("handed namespace {} over to sidecar pid {}; exiting", self.names.namespace, pid)
            return True
        if pid_alive(pid):
            logger.error("sidecar pid {} did not serve namespace {} within {:.0f}s of the handover",
                         pid, self.names.namespace, SUCCESSOR_WAIT_S)
        return False

    def _serves(self, pid: int) -> bool:
        """Whether sidecar ``pid`` has made the namespace READY."""
        try:
            region = Region.attach(self.names, readonly=True, with_data=False)
        except (SidecarUnavailable, LayoutMismatch):
            return False
        try:
            return region.sidecar_pid == pid and int(region.header["state"]) == SidecarState.READY
        finally:
            region.close()

    def _revive(self) -> bool:
        """The successor died after the handover, before it served: with
        the models still loaded, create the namespace again (a new epoch;
        workers attach to it as after any restart). Not under systemd: the
        successor may have named itself the unit's main process already, and
        this one cannot tell; the unit's Restart= starts a fresh sidecar."""
        pid = self.successor
        if pid_alive(pid) or self._stop.is_set():
            return False
        if os.environ.get("NOTIFY_SOCKET"):
            logger.error("successor sidecar pid {} died before it served namespace {}; exiting for the "
                         "service manager to restart the unit", pid, self.names.namespace)
            return False
        logger.warning("successor sidecar pid {} died before it served namespace {}; serving it again",
                       pid, self.names.namespace)
        self.successor = 0
        self._failures = 0
        # Its other threads may still be exiting, its locks (the takeover
        # lock, held until it serves, and maybe the namespace lock) with them.
        deadline = time.monotonic() + REVIVE_WAIT_S
        while lock_is_held(self.names.takeover) and time.monotonic() < deadline:
            time.sleep(0.005)
        remove_unheld_lock(self.names.takeover)
        try:
            self.create()
        except NamespaceInUse as exc:
            logger.error("cannot serve namespace {} again: {}", self.names.namespace, exc)
            return False
        return True

    def _progress(self, call_ns: float = 0.0) -> None:
        """Publish that the loop is alive, and when it will show progress
        again at the latest (longer while a model call of ``call_ns`` runs)."""
        if self._failures >= FAILURES_BEFORE_WEDGED:
            return  # failing every round is no progress
        hv = self.hv
        now = time.monotonic_ns()
        self._deadline_ns = now + self._stall_ns + int(call_ns)
        hv.loop_ns[0] = now
        hv.loop_deadline_ns[0] = self._deadline_ns

    def _model_outcome(self, ok: bool) -> None:
        """The scheduler's report of a model call: one that raised adds to the
        failures in a row (FAILURES_BEFORE_WEDGED), one that returned ends them."""
        self._failures = 0 if ok else self._failures + 1

    def _heartbeat_loop(self) -> None:
        """Publish the heartbeat; feed systemd's watchdog only while the
        batching loop keeps its deadline; give up on a loop wedged for
        ``wedge_exit_s`` (counted in this thread's own running time, so a
        paused VM that resumes is not taken for a wedge)."""
        header = self.region.header
        interval = self.settings.heartbeat_s
        wd_s = _watchdog_seconds()
        if not wd_s and self._took_over and os.environ.get("NOTIFY_SOCKET"):
            wd_s = TAKEOVER_WATCHDOG_S
        next_wd = 0.0
        wedged_since = None
        while not self._beat_stop.wait(interval):
            now_ns = time.monotonic_ns()
            header["heartbeat_ns"] = now_ns
            now = now_ns / 1e9
            on_time = now_ns <= self._deadline_ns
            if on_time:
                wedged_since = None
            else:
                if wedged_since is None:
                    wedged_since = now
                    logger.error("the batching loop has missed its deadline (no progress for {:.1f}s)",
                                 (now_ns - int(header["loop_ns"])) / 1e9)
                limit = self.settings.wedge_exit_s
                if limit and now - wedged_since >= limit:
                    self._give_up()
            if wd_s and on_time and now >= next_wd:
                self.notify("WATCHDOG=1")
                next_wd = now + wd_s / 4

    def _give_up(self) -> None:
        """The loop stayed wedged: remove the namespace (workers fail fast on
        it, then attach to the next sidecar) and exit for the supervisor to
        restart us. From the heartbeat thread; the loop thread is stuck."""
        logger.critical("the batching loop stayed wedged for {}s; exiting so a fresh sidecar can start",
                        self.settings.wedge_exit_s)
        try:
            self.region.header["state"] = SidecarState.STOPPED
            self._unlink_own()
            if self._lock is not None:
                self._lock.release()
        finally:
            os._exit(EXIT_WEDGED)

    # -- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        interval = self.settings.heartbeat_s
        # How long the loop polls the doorbell after its last work before it
        # parks: a short spin where torch needs the cores, longer where the
        # model leaves them free (the next request then costs no wake-up).
        spin_ns = 1000 * (self.settings.idle_poll_us if self.wait_policy == WaitPolicy.SPIN
                          else self.settings.spin_us)
        sched = self.scheduler
        next_reap = 0.0
        idle = True
        last_work_ns = 0
        trim = _malloc_trim()
        takeover = self.hv.takeover_pid
        while not self._stop.is_set():
            self._progress()
            if takeover[0] and self._accept_takeover():
                return
            try:
                if idle and not sched.spin_for_bell(last_work_ns + spin_ns):
                    if not sched.bell.wait(TRIM_IDLE_S if sched.trim_pending else interval):
                        if sched.trim_pending:  # idle since a large batch: give its memory back
                            sched.trim_pending = False
                            trim()
                now = time.monotonic()
                if now >= next_reap:
                    next_reap = now + interval  # first: a reaper that raises must not run every round
                    sched.reap_dead_rings()
                idle = not sched.step()
                if not idle:
                    last_work_ns = time.monotonic_ns()
            except Exception as exc:  # one fault must not stop the service; step() failed its slots
                self._failures += 1
                self.counters.loop_errors[0] += 1
                self._log_fault("ERROR", "batching loop survived {!r}", exc)
                time.sleep(0.001)  # a fault that repeats at once must not spin a core
                idle = True

    # -- clean stop ---------------------------------------------------------------------
    def _drain(self) -> bool:
        """Answer what is in flight, refuse what comes after. For a successor
        that died or withdrew meanwhile, go back to serving instead: returns False."""
        header = self.region.header
        header["state"] = SidecarState.DRAINING
        deadline = time.monotonic() + DRAIN_CLAIMED_WAIT_S
        while True:
            self._progress()
            try:
                served = self.scheduler.step()
            except Exception as exc:
                self._log_fault("ERROR", "draining survived {!r}", exc)
                served = False
            claimed = bool((self.slot_views.state == SLOT_CLAIMED).any())
            if not served and (not claimed or time.monotonic() > deadline):
                break
            if not served:
                time.sleep(0.001)
        # NOTE: a successor stopped before the handover withdraws by letting go
        # of the takeover lock, then waits to see READY (or HANDED_OVER, when
        # this check came first).
        withdrawn = self.successor and not lock_is_held(self.names.takeover)
        if self.successor and (withdrawn or not pid_alive(self.successor)):
            logger.warning("successor pid {} {} while this sidecar drained for it; serving on", self.successor,
                           "withdrew" if withdrawn else "died")
            self.successor = 0
            self.hv.takeover_pid[0] = 0
            remove_unheld_lock(self.names.takeover)
            header["state"] = SidecarState.READY
            return False
        header["state"] = SidecarState.HANDED_OVER if self.successor else SidecarState.STOPPED
        self.scheduler.refuse_ready()
        return True
