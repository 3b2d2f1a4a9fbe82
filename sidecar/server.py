"""The sidecar: owns the namespace's objects and runs the batching loop.

One thread runs the loop (scan, plan, validate, embed, answer, reap) and
publishes its progress; a second one writes the heartbeat, which proves the
process runs. A stopped process (SIGSTOP, a paused VM) shows a stale
heartbeat; a wedged loop (a hung model call, a lock) shows a loop past its
deadline. Either makes the sidecar unavailable to every reader (see the
layout's docstring for the rules). Batch planning lives in
:mod:`sidecar.planner`, pure and tested without a model.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import posix_ipc
from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.errors import LayoutMismatch, RingTableBusy, SidecarUnavailable
from shm_protocol.logs import RateLimitedLog
from shm_protocol.layout import (
    BATCH_TEXTS_BUCKETS,
    ETA_PARK,
    LATENCY_BUCKETS_S,
    SLOT_BUSY,
    SLOT_CLAIMED,
    SLOT_DONE,
    SLOT_ERROR,
    SLOT_FREE,
    SLOT_READY,
    LayoutParams,
    SidecarState,
    SlotError,
    RecordViews,
    SlotViews,
    WaitPolicy,
    bucket_index,
)
from shm_protocol.region import Region
from shm_protocol.segments import (
    DEV_SHM,
    SEMAPHORE_BYTES,
    Names,
    NamespaceLock,
    check_shm_space,
    create_semaphore,
    drain,
    pid_alive,
    unlink_namespace,
)

from .planner import CallTimer, admit, fair_order, plan_calls

#: A model call of at least this many padded tokens leaves hundreds of MB of
#: activations in the C heap (a batch of 200 passages: about 300 MB), which
#: glibc keeps. After such a call, once no work has come for TRIM_IDLE_S, the
#: loop hands the free pages back (malloc_trim: about 20 ms, only when idle).
TRIM_AFTER_TOKENS = 2048
TRIM_IDLE_S = 0.05

#: A model call is expected to end within this many times its estimate
#: before the loop's deadline passes (calls of one size vary by 2x under load).
CALL_DEADLINE_FACTOR = 4

#: Exit status of a sidecar that gave up on its wedged loop (EX_SOFTWARE).
EXIT_WEDGED = 70

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


def validate_slot(n_texts: int, n_tokens: int, offsets: np.ndarray, tokens: np.ndarray, p: LayoutParams):
    """Check what a worker wrote. Returns (SlotError, lengths, private copy of
    the ids). The ids are copied out of shared memory *before* they are
    checked, so a writer cannot change them between check and use."""
    if not (1 <= n_texts <= p.max_texts) or not (1 <= n_tokens <= p.max_tokens):
        return SlotError.BAD_COUNT, None, None
    if n_texts == 1:  # one text: the same checks on plain ints
        if int(offsets[0]) != 0 or int(offsets[1]) != n_tokens:
            return SlotError.BAD_OFFSETS, None, None
        if n_tokens > p.max_seq_length:
            return SlotError.TOO_LONG, None, None
        ids = tokens[:n_tokens].copy()
        if int(ids.view(np.uint32).max()) >= p.vocab_size:  # one pass: a negative id reads as >= 2**31
            return SlotError.BAD_TOKEN, None, None
        return SlotError.NONE, np.array([0, n_tokens], np.int64), ids
    offs = offsets[: n_texts + 1].astype(np.int64)
    ids = np.array(tokens[:n_tokens], dtype=np.int32, copy=True)
    if offs[0] != 0 or offs[-1] != n_tokens:
        return SlotError.BAD_OFFSETS, None, None
    lengths = np.diff(offs)
    if (lengths <= 0).any():
        return SlotError.BAD_OFFSETS, None, None
    if (lengths > p.max_seq_length).any():
        return SlotError.TOO_LONG, None, None
    if int(ids.min()) < 0 or int(ids.max()) >= p.vocab_size:
        return SlotError.BAD_TOKEN, None, None
    return SlotError.NONE, offs, ids


@dataclass
class _Work:
    """One valid slot taken into the current batch."""

    flat: int
    seq: int  # the slot's generation when taken: the answer is published only to it
    offsets: np.ndarray
    ids: np.ndarray
    texts: int
    queue_ns: int
    remaining: int = 0
    answered: bool = False
    call_ns: int = 0  # the model calls its texts rode in, together (published as compute_ns)
    last_call: int = -1

    def __post_init__(self) -> None:
        self.remaining = self.texts

    def lengths(self) -> list[int]:
        o = self.offsets.tolist()  # plain ints: cheaper than np.diff for the usual few texts
        return [b - a for a, b in zip(o, o[1:])]


def _watchdog_seconds() -> float:
    """systemd's watchdog interval for this process, or 0 when none is set."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


class Sidecar:
    """Creates the namespace, serves it until stopped, then removes it."""

    def __init__(self, settings: Settings, embedder, *, notify: Callable[[str], None] | None = None):
        self.settings = settings
        self.embedder = embedder
        self.names = Names(settings.namespace)
        self.notify = notify or (lambda msg: None)
        self._stop = threading.Event()
        self._timer = CallTimer()
        self._last_batch_slots = 0
        # How many slots of one batch may have their waiters spin: the cores
        # the model leaves free (a GPU or synthetic model leaves all but this process's).
        cores = len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
        model_cores = (settings.torch_threads or cores) if getattr(embedder, "uses_cpu", True) else 1
        self._spin_slots = max(1, cores - model_cores)
        self.wait_policy = choose_wait_policy(settings.wait_policy, getattr(embedder, "uses_cpu", True), cores)
        self._trim_pending = False  # a large model call ran since the heap was last trimmed
        self._stall_ns = int(settings.loop_stall_s * 1e9)
        # The loop's deadline, kept here and only published: the heartbeat
        # thread must not trust a header field every worker can write.
        self._deadline_ns = 0
        self._failures = 0  # batches or loop rounds in a row that failed
        self._log_fault = RateLimitedLog()
        self._lock: NamespaceLock | None = None
        self.region: Region | None = None
        self.v: SlotViews | None = None
        self.epoch = 0

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
        s, info = self.settings, self.embedder.info
        params = LayoutParams(
            n_rings=s.rings,
            slots_per_ring=s.slots_per_ring,
            max_texts=s.slot_texts,
            max_tokens=max(s.slot_tokens, info.max_seq_length),
            dim=info.dim,
            max_seq_length=info.max_seq_length,
            vocab_size=info.vocab_size,
        )
        self._lock = NamespaceLock(self.names, mode=s.ipc_mode, group=s.group)
        try:
            self.reap_stale_namespace()
            n_sems = 1 + params.n_rings * params.slots_per_ring
            check_shm_space(params.ctl_bytes + params.data_bytes + n_sems * SEMAPHORE_BYTES)
            self.region = region = Region.create(self.names, params, mode=s.ipc_mode, group=s.group)
            self.bell = create_semaphore(self.names.bell, 0, mode=s.ipc_mode, group=s.group)
            self.sems = [
                [create_semaphore(self.names.slot(r, k), 0, mode=s.ipc_mode, group=s.group)
                 for k in range(params.slots_per_ring)]
                for r in range(params.n_rings)
            ]
        except BaseException:
            self.destroy()
            raise
        self.flat_sems = [sem for ring in self.sems for sem in ring]
        self.params = params
        n_slots = params.n_rings * params.slots_per_ring
        # When the sidecar first saw each READY slot (and that slot's
        # generation then): batches are ordered by this, not by the worker's clock.
        self._seen_ns = np.zeros(n_slots, np.uint64)
        self._seen_seq = np.zeros(n_slots, np.uint64)
        # A drain of the doorbell takes at most this many posts per scan: one
        # per slot is all honest workers can owe it; a hostile process could
        # have pushed it to SEM_VALUE_MAX (minutes to drain).
        self._bell_drain_limit = 4 * n_slots + 64
        h = region.header
        region.set_text_field("model_name", info.name)
        region.set_text_field("tokenizer_path", info.tokenizer_path)
        region.set_text_field("device", info.device)
        h["max_batch_tokens"] = s.max_batch_tokens
        h["max_batch_texts"] = s.max_batch_texts
        h["wait_policy"] = self.wait_policy
        h["sidecar_pid"] = os.getpid()
        self.epoch = int.from_bytes(os.urandom(8), "little") >> 1 | 1
        h["epoch"] = self.epoch
        region.epoch = self.epoch
        h["started_ns"] = time.time_ns()
        h["heartbeat_ns"] = time.monotonic_ns()
        self.v = SlotViews(region.slots.reshape(-1))
        self.ctr = RecordViews(h["stats"])  # the hot path's counters, a view each
        self.hv = RecordViews(h)
        self._progress()
        h["state"] = SidecarState.READY  # last: workers may attach from here on
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
        if getattr(self, "bell", None) is not None:
            self.bell.close()
        self._unlink_own()
        if self.region is not None:
            self.v = self.ctr = self.hv = None
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

    def serve(self) -> None:
        """Create the namespace, run until stopped, drain, remove everything."""
        self.create()
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        self.notify("READY=1")
        try:
            self._loop()
            self._drain()
        finally:
            self._stop.set()
            hb.join(timeout=2)
            if self.region is not None:
                self.region.header["state"] = SidecarState.STOPPED
            self.destroy()
            logger.info("stopped; namespace {} removed", self.names.namespace)

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

    def _heartbeat_loop(self) -> None:
        """Publish the heartbeat; feed systemd's watchdog only while the
        batching loop keeps its deadline; give up on a loop wedged for
        ``wedge_exit_s`` (counted in this thread's own running time, so a
        paused VM that resumes is not taken for a wedge)."""
        header = self.region.header
        interval = self.settings.heartbeat_s
        wd_s = _watchdog_seconds()
        next_wd = 0.0
        wedged_since = None
        while not self._stop.wait(interval):
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
        next_reap = 0.0
        idle = True
        last_work_ns = 0
        trim = _malloc_trim()
        while not self._stop.is_set():
            self._progress()
            try:
                if idle and not self._spin_for_bell(last_work_ns + spin_ns):
                    try:
                        self.bell.acquire(TRIM_IDLE_S if self._trim_pending else interval)
                    except posix_ipc.BusyError:
                        if self._trim_pending:  # idle since a large batch: give its memory back
                            self._trim_pending = False
                            trim()
                    except posix_ipc.SignalError:
                        continue
                now = time.monotonic()
                if now >= next_reap:
                    next_reap = now + interval  # first: a reaper that raises must not run every round
                    self.reap_dead_rings()
                idle = not self.step()
                if not idle:
                    last_work_ns = time.monotonic_ns()
            except Exception as exc:  # one fault must not stop the service; step() failed its slots
                self._failures += 1
                self.ctr.loop_errors[0] += 1
                self._log_fault("ERROR", "batching loop survived {!r}", exc)
                time.sleep(0.001)  # a fault that repeats at once must not spin a core
                idle = True

    def _spin_for_bell(self, until_ns: int) -> bool:
        """Poll the doorbell until ``until_ns``: right after a batch the next
        request usually comes within microseconds, and parking would add a
        wake-up of 100 us or more on a virtual machine."""
        bell = self.bell
        while time.monotonic_ns() < until_ns:
            try:
                bell.acquire(0)
                return True
            except posix_ipc.BusyError:
                os.sched_yield()
        return False

    def _scan(self) -> np.ndarray:
        """READY slots now, each stamped with when the sidecar first saw it."""
        # Drain before the scan: a later post wakes the next scan.
        if drain(self.bell, self._bell_drain_limit) >= self._bell_drain_limit:
            try:
                self._replace_bell()
            except Exception as exc:  # keep the old one (drained in bounded steps) and keep serving
                self._log_fault("ERROR", "could not replace the doorbell: {!r}", exc)
        ready = np.flatnonzero(self.v.state == SLOT_READY)
        if len(ready) == 1:  # the common case of a lone request: plain ints, no temporaries
            f = int(ready[0])
            seq = int(self.v.seq[f])
            if self._seen_ns[f] == 0 or self._seen_seq[f] != seq:
                self._seen_ns[f] = time.monotonic_ns()
                self._seen_seq[f] = seq
        elif len(ready):
            seqs = self.v.seq[ready]
            new = (self._seen_ns[ready] == 0) | (self._seen_seq[ready] != seqs)
            if new.any():
                self._seen_ns[ready[new]] = time.monotonic_ns()
                self._seen_seq[ready[new]] = seqs[new]
        return ready

    def _replace_bell(self) -> None:
        """The doorbell holds more posts than every slot could owe: someone
        wrote its value. Draining up to SEM_VALUE_MAX takes minutes of a hot
        loop, so put a new doorbell under the same name and tell the workers
        (bell_gen); a post that went to the old one meanwhile is found by the
        next scan, which comes within a heartbeat interval."""
        s = self.settings
        self.ctr.loop_errors[0] += 1
        self._log_fault("ERROR", "the doorbell holds over {} posts (tampered with); replacing it",
                        self._bell_drain_limit)
        # Create the new doorbell under a spare name, then rename its file
        # over the old one: the name never lacks a doorbell, and a failure
        # (a full /dev/shm) leaves the old one in place.
        new = create_semaphore(self.names.bell_next, 0, mode=s.ipc_mode, group=s.group)
        try:
            os.rename(DEV_SHM / f"sem.{self.names.bell_next.lstrip('/')}",
                      DEV_SHM / f"sem.{self.names.bell.lstrip('/')}")
        except OSError:
            new.close()
            posix_ipc.unlink_semaphore(self.names.bell_next)
            raise
        old, self.bell = self.bell, new
        old.close()
        self.region.header["bell_gen"] += 1

    def step(self) -> bool:
        """Serve one batch of READY slots. Returns False if there was none."""
        ready = self._scan()
        self.ctr.ready_slots[0] = len(ready)
        if len(ready) == 0:
            return False
        s = self.settings
        if s.max_wait_us and len(ready) < min(self._last_batch_slots, s.max_batch_texts):
            # Linger only while fewer slots are ready than the last batch held:
            # under steady concurrency the rest arrive within a millisecond or
            # two, and one batch of 8 runs far faster than 8 batches of 1. A
            # lone client (last batch 1) never waits.
            deadline = time.monotonic() + s.max_wait_us / 1e6
            while len(ready) < self._last_batch_slots and (left := deadline - time.monotonic()) > 0:
                try:
                    self.bell.acquire(left)
                except (posix_ipc.BusyError, posix_ipc.SignalError):
                    break
                ready = self._scan()
        if len(ready) == 1:
            order = [int(ready[0])]
        else:
            order = fair_order(ready, self._seen_ns[ready], self.params.slots_per_ring)
        batch = admit(order, self.v.n_texts, self.v.n_tokens, s.max_batch_texts, s.max_batch_tokens)
        works: list[_Work] = []
        try:
            self._take(batch, works)
            if works:
                self._serve_batch(works)
        finally:
            # Whatever happened, no slot of this batch stays BUSY: the reaper
            # and the lease rules rely on BUSY ending with the step.
            for w in works:
                if not w.answered:
                    self._finish(w, SlotError.MODEL_FAILED)
            self.ctr.busy_slots[0] = 0
        return True

    def _take(self, batch: list[int], works: list[_Work]) -> None:
        """Mark the batch's slots BUSY and validate each on a private copy; a
        bad slot is answered with its error at once and never joins. Valid
        ones go into ``works``, the caller's list, as soon as they are BUSY
        (so the caller answers them whatever happens after)."""
        p, v = self.params, self.v
        t0 = time.monotonic_ns()
        for flat in batch:
            seq = int(v.seq[flat])
            v.state[flat] = SLOT_BUSY
            queue_ns = max(0, t0 - int(self._seen_ns[flat]))
            self._seen_ns[flat] = 0
            # Read once: the counts checked are the counts used (a worker may write at any time).
            n_texts, n_tokens = int(v.n_texts[flat]), int(v.n_tokens[flat])
            work = _Work(flat, seq, None, None, n_texts, queue_ns)
            works.append(work)
            if int(v.cancel[flat]) == seq:  # its waiter gave up: no model time for it
                works.pop()
                self._finish(work, SlotError.CANCELLED)
                continue
            try:
                code, offs, ids = validate_slot(n_texts, n_tokens, v.offsets[flat], v.tokens[flat], p)
            except Exception as exc:  # a slot's bytes must not be able to raise out of here
                self.ctr.loop_errors[0] += 1
                self._log_fault("ERROR", "validating slot {} raised {!r}", flat, exc)
                code, offs, ids = SlotError.BAD_COUNT, None, None
            if code != SlotError.NONE:
                works.pop()
                self._finish(work, code)
                self._log_fault("WARNING", "rejected slot {} (ring {}): {}", flat % p.slots_per_ring,
                                flat // p.slots_per_ring, code.name)
                continue
            work.offsets, work.ids = offs, ids

    def _serve_batch(self, works: list[_Work]) -> None:
        ctr = self.ctr
        ctr.busy_slots[0] = len(works)
        self._last_batch_slots = len(works)
        if len(works) == 1 and works[0].texts == 1:
            self._serve_one(works[0])
            return
        t0 = time.monotonic_ns()
        plan = plan_calls([w.lengths() for w in works], min(self.settings.max_batch_tokens,
                                                              self.embedder.capacity_tokens),
                          self.settings.max_batch_texts)
        if len(works) > self._spin_slots:
            # More waiters than spare cores: spinning ones would take the
            # model's cores, so they park until the post.
            self.v.eta_ns[[w.flat for w in works]] = ETA_PARK
        else:
            etas = self._timer.etas(plan, len(works), t0)
            if etas is not None:
                for w, eta in zip(works, etas):
                    self.v.eta_ns[w.flat] = eta
        for ci, (start, end, width) in enumerate(plan.calls):
            chunk = plan.items[start:end]
            seqs = [works[wi].ids[works[wi].offsets[i]: works[wi].offsets[i + 1]] for _, wi, i in chunk]
            try:
                vecs, call_ns = self._call(seqs, width)
            except Exception as exc:  # a model failure fails these slots, not the sidecar
                self._model_failed(exc, {works[wi].flat: works[wi] for _, wi, _ in chunk}.values(), t0)
                continue
            live = [(wi, i, k) for k, (_, wi, i) in enumerate(chunk) if not works[wi].answered]
            if len(live) == 1:  # a lone text: no index arrays
                wi, i, k = live[0]
                self.v.out[works[wi].flat, i] = vecs[k]
            elif live:
                flats = np.fromiter((works[wi].flat for wi, _, _ in live), dtype=np.int64, count=len(live))
                rows = np.fromiter((i for _, i, _ in live), dtype=np.int64, count=len(live))
                self.v.out[flats, rows] = vecs[[k for _, _, k in live]] if len(live) < len(chunk) else vecs
            finished = []
            for _, wi, _ in chunk:
                w = works[wi]
                if not w.answered:
                    if w.last_call != ci:
                        w.last_call = ci
                        w.call_ns += call_ns
                    w.remaining -= 1
                    if w.remaining == 0:
                        finished.append(w)
            # Answer first, count after: the waiters should not wait on our bookkeeping.
            published = [w for w in finished if self._publish(w, SlotError.NONE, w.call_ns, len(plan.items))]
            self._account(end - start, width, call_ns)
            for w in published:
                self._count(w, SlotError.NONE)

    def _serve_one(self, w: _Work) -> None:
        """The batch of a lone one-text request (the latency floor): the same
        steps as _serve_batch without planning, sorting or index arrays."""
        t0 = time.monotonic_ns()
        width = len(w.ids)
        if self._spin_slots < 1:
            self.v.eta_ns[w.flat] = ETA_PARK
        else:
            est = self._timer.estimate(1, width)
            if est is not None:
                self.v.eta_ns[w.flat] = t0 + int(est)
        try:
            vecs, w.call_ns = self._call([w.ids], width)
        except Exception as exc:
            self._model_failed(exc, (w,), t0)
            return
        self.v.out[w.flat, 0] = vecs[0]
        published = self._publish(w, SlotError.NONE, w.call_ns, 1)
        self._account(1, width, w.call_ns)
        if published:
            self._count(w, SlotError.NONE)

    def _call(self, seqs: list[np.ndarray], width: int) -> tuple[np.ndarray, int]:
        """One model call of ``seqs`` (padded to ``width``) under the loop's
        deadline; returns the vectors and the call's nanoseconds (which the
        caller counts with _account once it has answered)."""
        rows = len(seqs)
        est = self._timer.estimate(rows, width)
        self._progress(CALL_DEADLINE_FACTOR * est if est is not None else self.settings.model_call_max_s * 1e9)
        c0 = time.monotonic_ns()
        vecs = self.embedder.embed(seqs)
        call_ns = time.monotonic_ns() - c0
        self._failures = 0
        self._progress()
        self._timer.record(rows, width, call_ns)
        return vecs, call_ns

    def _account(self, rows: int, width: int, call_ns: int) -> None:
        ctr = self.ctr
        padded = rows * width
        ctr.batches[0] += 1
        ctr.padded_tokens[0] += padded
        if padded >= TRIM_AFTER_TOKENS:
            self._trim_pending = True
        ctr.batch_texts_hist[bucket_index(rows, BATCH_TEXTS_BUCKETS)] += 1
        ctr.compute_hist[bucket_index(call_ns / 1e9, LATENCY_BUCKETS_S)] += 1
        ctr.compute_ns_sum[0] += call_ns

    def _model_failed(self, exc: Exception, works, t0: int) -> None:
        """A model call raised: its slots fail (MODEL_FAILED), the sidecar goes on."""
        self._failures += 1
        works = [w for w in works if not w.answered]
        self._log_fault("ERROR", "model failed on a batch of {} requests: {!r}", len(works), exc)
        for w in works:
            self._finish(w, SlotError.MODEL_FAILED, time.monotonic_ns() - t0)

    def _finish(self, work: _Work, code: SlotError, compute_ns: int = 0) -> None:
        if self._publish(work, code, compute_ns, 0):
            self._count(work, code)

    def _publish(self, work: _Work, code: SlotError, compute_ns: int, batch_texts: int) -> bool:
        """Publish a slot's outcome, only to the request it was taken for.
        NOTE: fields, then state, then post. Returns whether it was published."""
        work.answered = True
        v, flat = self.v, work.flat
        if int(v.state[flat]) != SLOT_BUSY or int(v.seq[flat]) != work.seq:
            # Its owner wrote the slot while it was in the model (a hostile or
            # broken worker; the lease rules keep honest ones out): the answer
            # belongs to nobody now.
            self.ctr.stale_answers[0] += 1
            self._log_fault("WARNING", "slot {} changed generation while in the model; answer dropped", flat)
            return False
        v.error[flat] = code
        v.queue_ns[flat] = work.queue_ns
        v.compute_ns[flat] = compute_ns
        v.batch_texts[flat] = batch_texts
        v.state[flat] = SLOT_DONE if code == SlotError.NONE else SLOT_ERROR
        try:
            self.flat_sems[flat].release()
        except (posix_ipc.Error, OSError) as exc:
            # E.g. EOVERFLOW: someone pushed the semaphore to its maximum. The
            # state is published; the waiter finds it at its next poll.
            self.ctr.loop_errors[0] += 1
            self._log_fault("ERROR", "posting slot {}'s semaphore failed: {!r}", flat, exc)
        return True

    def _count(self, work: _Work, code: SlotError) -> None:
        ctr = self.ctr
        if code == SlotError.NONE:
            ctr.requests[0] += 1
            ctr.texts[0] += work.texts
            ctr.tokens[0] += len(work.ids)
            ctr.queue_ns_sum[0] += work.queue_ns
            ctr.queue_hist[bucket_index(work.queue_ns / 1e9, LATENCY_BUCKETS_S)] += 1
        else:
            ctr.errors[int(code)] += 1

    # -- rings of dead workers ----------------------------------------------------------
    def reap_dead_rings(self) -> int:
        """Free rings whose owner died or gave them up with slots in flight
        (ORPHANED, also set by Gunicorn's child_exit). Runs in the loop thread
        between batches, so none of the ring's slots is BUSY while it is reset.
        Never waits for the ring-table lock: a holder that is stopped would
        stop the loop with it; the reaper tries again next round."""
        rings = self.region.rings
        owners = rings["owner_pid"]
        suspects = [r for r in np.flatnonzero(owners != 0).tolist()
                    if int(owners[r]) < 0 or not pid_alive(int(owners[r]))]
        if not suspects:
            return 0
        spr = self.params.slots_per_ring
        try:
            with self.region.lock_rings(timeout=0):
                for r in suspects:
                    owner = int(owners[r])
                    if owner > 0 and pid_alive(owner):
                        continue
                    for k in range(spr):
                        flat = r * spr + k
                        if int(self.v.state[flat]) in (SLOT_READY, SLOT_CLAIMED):
                            self.ctr.errors[SlotError.REAPED] += 1
                        self.v.state[flat] = SLOT_FREE
                        self._seen_ns[flat] = 0
                        drain(self.sems[r][k], self._bell_drain_limit)
                    rings[r]["owner_pid"] = 0
                    self.ctr.rings_reaped[0] += 1
                    logger.info("reaped ring {} of {}", r, "a closed client" if owner < 0 else f"dead pid {owner}")
        except RingTableBusy:
            self._log_fault("WARNING", "ring table locked by another process; reaping {} ring(s) later",
                            len(suspects))
            return 0
        return len(suspects)

    # -- clean stop ---------------------------------------------------------------------
    def _drain(self) -> None:
        """Answer what is in flight, refuse what comes after."""
        header = self.region.header
        header["state"] = SidecarState.DRAINING
        deadline = time.monotonic() + 0.25
        while True:
            self._progress()
            try:
                served = self.step()
            except Exception as exc:
                self._log_fault("ERROR", "draining survived {!r}", exc)
                served = False
            claimed = bool((self.v.state == SLOT_CLAIMED).any())
            if not served and (not claimed or time.monotonic() > deadline):
                break
            if not served:
                time.sleep(0.001)
        header["state"] = SidecarState.STOPPED
        for flat in np.flatnonzero(self.v.state == SLOT_READY).tolist():
            self.v.state[flat] = SLOT_BUSY
            self._finish(_Work(flat, int(self.v.seq[flat]), None, np.empty(0, np.int32), 0, 0),
                         SlotError.SHUTDOWN)
