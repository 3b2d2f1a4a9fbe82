"""A process's lease on one ring of one sidecar epoch, and the transport
over it: taking a slot, submitting a request part, waiting for its answer
and copying it out, giving up and handing the ring back. The object that
writes a slot also waits for it (as vLLM's ``MessageQueue`` does); the
steps that run per request are the compiled hot path (:mod:`.hotpath`).
The lease rules and the order of writes are in :mod:`shm_protocol.layout`'s
docstring."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque

import numpy as np
from loguru import logger

from . import hotpath
from .cache import KEY_WORDS, CacheReader
from .config import Settings
from .errors import (
    LayoutMismatch,
    ModelFailed,
    RequestCancelled,
    RingFull,
    ShmEmbedError,
    SidecarTimeout,
    SidecarUnavailable,
    SlotRejected,
)
from .layout import (
    ETA_NONE,
    ETA_PARK,
    SLOT_BUSY,
    SLOT_CLAIMED,
    SLOT_DONE,
    SLOT_ERROR,
    SLOT_FREE,
    SLOT_READY,
    ModelEntry,
    RecordViews,
    SlotError,
    SlotViews,
    WaitPolicy,
)
from .logs import RateLimitedLog
from .region import Region
from .segments import ORPHANED

#: Posts a slot's semaphore may legitimately hold before a submit: one per
#: abandoned request at most. More means someone wrote the semaphore's value
#: in /dev/shm; draining up to SEM_VALUE_MAX would take minutes, so the slot
#: is retired instead.
SLOT_DRAIN_LIMIT = 64

#: First look for a slot's ETA after submitting it; an idle sidecar has picked
#: it up by then. Doubles with each look that finds none.
PICKUP_LOOK_S = 0.002

#: Waiters that may poll at once under the spin policy: the cores this
#: process may run on, less one for the sidecar. More queued work than that
#: and waiters park (they would only take turns on the same cores).
SPIN_WAITERS = max(1, len(os.sched_getaffinity(0)) - 1)

#: What Ring.collect returns besides a SlotError code: rows of another width
#: than the client expects; no answer of this generation in the slot.
COLLECT_WIDTH, COLLECT_UNANSWERED = -1, -2

#: A doorbell that cannot be rung fails every submit until it is replaced: one line per 5 s.
_log_bell_failure = RateLimitedLog()

#: Slot states in which the sidecar may still read or write the slot.
_IN_FLIGHT = (SLOT_CLAIMED, SLOT_READY, SLOT_BUSY)

#: The cancel event of the request this thread runs, if any (see cancellable).
_thread_request = threading.local()


@contextlib.contextmanager
def cancellable(event: threading.Event):
    """Requests this thread runs inside the block end with RequestCancelled
    once ``event`` is set: the wait notices within one poll interval (50 ms
    at most) and its slots are given up as after a timeout. The asyncio
    client runs each call in a thread inside such a block."""
    _thread_request.cancel = event
    try:
        yield
    finally:
        _thread_request.cancel = None


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("the caller cancelled the request")


class Session:
    """This process's lease on one ring of one sidecar epoch, and the
    requests that go through it (any thread of the process may run one)."""

    def __init__(self, region: Region, ring: int, settings: Settings, models: list[ModelEntry] | None = None):
        self.region = region
        self.ring = ring
        self.settings = settings
        self.pid = os.getpid()
        self.epoch = region.epoch
        names = region.names
        params = region.params
        self.params = params
        self._bell_gen_now = region.header["bell_gen"]  # a view: the sidecar bumps it
        self.bell_gen = int(self._bell_gen_now)
        self.bell = hotpath.semaphore(names.bell)
        self.sems = [hotpath.semaphore(names.slot(ring, slot)) for slot in range(params.slots_per_ring)]
        self.slot_views = SlotViews(region.slots[ring])
        self.spin = int(region.header["wait_policy"]) == WaitPolicy.SPIN
        self.queued = RecordViews(region.header["stats"]).ready_slots  # the sidecar's queue depth
        self.hot = hotpath.ring(region.slots[ring], queued=self.queued)
        self.live = hotpath.liveness(region.header)
        self.state, self.seq, self.eta_ns = self.slot_views.state, self.slot_views.seq, self.slot_views.eta_ns
        # Free slots: a deque (appends and pops are atomic); a thread that
        # finds none waits on the condition, which give_back notifies only
        # when someone waits (the common path takes no lock).
        self._free: deque[int] = deque()
        self._free_cv = threading.Condition(threading.Lock())
        self._free_waiters = 0
        self._seq = itertools.count(int(time.monotonic_ns()))
        self._quarantine: set[int] = set()
        self._retired: set[int] = set()  # slots whose semaphore was tampered with: reset by the reaper
        self._q_lock = threading.Lock()
        self._use_lock = threading.Lock()
        self._users = 0
        self._closing = False
        self._old_bells: list = []  # replaced doorbells, closed with the session (a thread may still post)
        # The model table, fixed for the sidecar's epoch (the caller's checked copy),
        # and each model's tokenizer and text options (set by the client that attaches).
        self.models = region.models() if models is None else models
        # The epoch's embedding cache (None: the sidecar keeps none); lookups count on this ring.
        self.cache = CacheReader.attach(names, self.epoch, ring)
        self._key_words = region.slots[ring]["cache_keys"].view(np.uint64)  # (slots, max_texts * KEY_WORDS)
        # This epoch's tokenizers, text options and classifier labels by model index (set by the client).
        self.tokenizers: dict = {}
        self.options: dict = {}
        self.labels: dict = {}
        # Slots whose segment splits are not all zero (a reranker's request was there): cleared before reuse.
        self._segments_dirty = [True] * params.slots_per_ring
        for slot in range(params.slots_per_ring):
            # A fresh lease has every slot free; one still in flight (which the
            # lease rules exclude) is kept out of use until the sidecar is done.
            if int(self.state[slot]) in _IN_FLIGHT:
                self._quarantine.add(slot)
            else:
                self._free.append(slot)

    # -- slots --------------------------------------------------------------------
    def take_slot(self, timeout: float | None) -> int | None:
        """A free slot whose semaphore holds no stale post, or None after ``timeout``."""
        deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
        while True:
            self._recover_quarantined()
            try:
                slot = self._free.popleft()
            except IndexError:
                slot = self._wait_free(deadline)
                if slot is None:
                    return None
            # A post left by an earlier, abandoned request (bounded: see SLOT_DRAIN_LIMIT).
            if self.sems[slot].drain(SLOT_DRAIN_LIMIT) < SLOT_DRAIN_LIMIT:
                return slot
            self._retired.add(slot)
            logger.error("slot {} of ring {}: its semaphore holds more than {} posts (tampered with); "
                         "the slot is retired", slot, self.ring, SLOT_DRAIN_LIMIT)

    def _wait_free(self, deadline: float | None) -> int | None:
        if deadline is None:
            return None
        with self._free_cv:
            self._free_waiters += 1
            try:
                while True:
                    try:
                        return self._free.popleft()
                    except IndexError:
                        pass
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._free_cv.wait(left)
            finally:
                self._free_waiters -= 1

    def give_back(self, slot: int) -> None:
        self.hot.set_state(slot, SLOT_FREE)
        self._release(slot)

    def _release(self, slot: int) -> None:
        """``slot``, already FREE, is ours to take again."""
        self._free.append(slot)
        if self._free_waiters:
            with self._free_cv:
                self._free_cv.notify()

    def quarantine(self, slot: int) -> None:
        """An abandoned slot stays out of use until the sidecar has finished with it."""
        with self._q_lock:
            self._quarantine.add(slot)

    def _recover_quarantined(self) -> None:
        if not self._quarantine:
            return
        with self._q_lock:
            for slot in list(self._quarantine):
                if int(self.state[slot]) in (SLOT_DONE, SLOT_ERROR, SLOT_FREE):
                    self._quarantine.discard(slot)
                    self.give_back(slot)

    def abandon(self, slot: int) -> None:
        """A request left ``slot`` on an error: free it if the sidecar never
        saw it, else keep it out of use until the sidecar is done with it."""
        if int(self.state[slot]) in (SLOT_FREE, SLOT_CLAIMED):
            self.give_back(slot)
        else:
            self.give_up(slot, int(self.seq[slot]))

    def give_up(self, slot: int, seq: int) -> None:
        """Nobody waits for ``slot``'s answer to generation ``seq`` any more:
        the sidecar may skip it (cancel), and the slot stays out of use until
        the sidecar is done with it."""
        self.slot_views.cancel[slot] = seq
        self.quarantine(slot)

    def answered(self, slot: int, seq: int) -> bool:
        return self.hot.answered(slot, seq)

    def submit(self, slot: int, ids, lengths, model: int = 0, segments=None, out_dim: int = 0,
               cache_keys: np.ndarray | None = None) -> int:
        """Write one part of a request for model ``model`` into ``slot``
        (``ids``: int32 ids of its texts back to back, ``lengths``: tokens of
        each; ``segments``: where each pair's second part starts, for a
        reranker) and ring the doorbell. ``out_dim``: the width the answer's
        rows must have (0: unchecked; see ROW_MARK). ``cache_keys``: each
        text's embedding cache key (rows of KEY_WORDS words; None: nothing is
        cached). NOTE: the payload, then READY (release), then the doorbell:
        the compiled submit keeps that order."""
        # Every submit writes its texts' keys, zero when it sends none: keys
        # an earlier request left in the slot would make the sidecar store
        # this request's vectors under another text's key, for every worker.
        self._key_words[slot, :KEY_WORDS * len(lengths)] = 0 if cache_keys is None else cache_keys.ravel()
        seq = next(self._seq)
        if int(self._bell_gen_now) != self.bell_gen:
            try:
                self._reopen_bell()
            except (OSError, ShmEmbedError) as exc:
                _log_bell_failure("WARNING", "could not reopen the sidecar's new doorbell ({!r})", exc)
        clear = self._segments_dirty[slot] and segments is None
        self._segments_dirty[slot] = True  # until the submit is through: a failed one may leave splits behind
        sent = self.hot.submit(slot, ids, lengths, model, segments, seq, clear, self.bell, out_dim, ROW_MARK)
        self._segments_dirty[slot] = segments is not None
        if not sent:
            # E.g. EOVERFLOW on a doorbell someone pushed to its maximum. The
            # post is only a wake-up: the sidecar scans slot states at least
            # once per heartbeat interval and finds this READY slot anyway.
            _log_bell_failure("WARNING", "could not ring the sidecar's doorbell; it will find the "
                              "request at its next scan")
        return seq

    # -- one request ------------------------------------------------------------------
    def run(self, id_lists, lengths: np.ndarray, out: np.ndarray, model: int = 0,
            segments: np.ndarray | None = None, cache_keys: np.ndarray | None = None) -> tuple[int, int, int]:
        """Send a request (``id_lists``: one id list per text; ``lengths``
        their sizes) in as many slots as it needs, keeping every part in
        flight at once, and copy the answers into ``out`` in order. Returns
        (queue_ns, compute_ns, slots used): the largest over the parts.
        ``cache_keys``: each text's embedding cache key, for the sidecar to
        store its vector under (None: nothing is cached)."""
        params = self.params
        cancel = getattr(_thread_request, "cancel", None)
        _check_cancel(cancel)
        if len(lengths) == 1:  # one text (the usual query): one slot, no chunking
            chunks = [(0, 1)]
        else:
            chunks = self._chunks(lengths)
        pending: list[tuple[int, int, int, int]] = []  # (slot, seq, start, end)
        failure: BaseException | None = None
        queue_ns = compute_ns = 0
        ci = 0
        try:
            while ci < len(chunks) or pending:
                if ci < len(chunks) and failure is None:
                    _check_cancel(cancel)
                    # Take a slot without waiting while we hold parts in flight;
                    # otherwise wait (bounded) for one.
                    slot = self.take_slot(None) if pending else self._wait_for_slot(cancel)
                    if slot is not None:
                        start, end = chunks[ci]
                        ids = id_lists[start] if end - start == 1 else np.fromiter(
                            itertools.chain.from_iterable(id_lists[start:end]),
                            dtype=np.int32, count=int(lengths[start:end].sum()),
                        )
                        try:
                            seq = self.submit(slot, ids, lengths[start:end], model,
                                              None if segments is None else segments[start:end], out.shape[1],
                                              None if cache_keys is None else cache_keys[start:end])
                        except BaseException:
                            self.abandon(slot)
                            raise
                        pending.append((slot, seq, start, end))
                        ci += 1
                        continue
                    if not pending:
                        raise RingFull(
                            f"all {params.slots_per_ring} slots of this worker's ring stayed busy "
                            f"for {self.settings.ring_wait_s}s",
                            retry_after_s=1.0,
                        )
                if not pending:
                    break
                slot, seq, start, end = pending.pop(0)
                try:
                    q, c = self._collect(slot, seq, out[start:end], cancel)
                    queue_ns, compute_ns = max(queue_ns, q), max(compute_ns, c)
                except (SlotRejected, SidecarUnavailable) as exc:
                    failure = failure or exc
                    if isinstance(exc, SidecarUnavailable):
                        # Nothing more will come from this sidecar.
                        for s2, seq2, *_ in pending:
                            self.give_up(s2, seq2)
                        pending.clear()
        except BaseException:
            for s2, seq2, *_ in pending:
                self.give_up(s2, seq2)
            raise
        if failure is not None:
            raise failure
        return queue_ns, compute_ns, len(chunks)

    def _chunks(self, lengths: np.ndarray) -> list[tuple[int, int]]:
        """Split texts into runs that fit one slot (texts and tokens)."""
        p = self.params
        chunks, start, toks = [], 0, 0
        for i, n in enumerate(lengths.tolist()):
            if i > start and (i - start >= p.max_texts or toks + n > p.max_tokens):
                chunks.append((start, i))
                start, toks = i, 0
            toks += n
        chunks.append((start, len(lengths)))
        return chunks

    def _wait_for_slot(self, cancel: threading.Event | None = None) -> int | None:
        """A free slot within the admission wait, or None (RingFull). Checks
        the sidecar while waiting: slots held by a dead sidecar never free up,
        and that is SidecarUnavailable, not RingFull."""
        slot = self.take_slot(None)
        if slot is not None:
            return slot
        deadline = time.monotonic() + self.settings.ring_wait_s
        while True:
            slot = self.take_slot(min(0.05, max(0.0, deadline - time.monotonic())))
            if slot is not None:
                return slot
            _check_cancel(cancel)
            self.region.check_available(self.settings.stale_after_s, thorough=True)
            if time.monotonic() >= deadline:
                return None

    def _collect(self, slot: int, seq: int, dest: np.ndarray,
                 cancel: threading.Event | None = None) -> tuple[int, int]:
        """Wait for ``slot`` to be answered, copy its vectors into ``dest``.
        A wait that ends in any exception leaves the slot quarantined."""
        try:
            self._await_answer(slot, seq, cancel)
        except BaseException:
            self.give_up(slot, seq)
            raise
        # Checked, copied and freed in one compiled step (hotpath.c's collect).
        code, queue_ns, compute_ns = self.hot.collect(slot, seq, dest, ROW_MARK)
        if code == COLLECT_UNANSWERED:  # someone wrote the slot after its answer: not ours to read
            self.give_up(slot, seq)
            raise SlotRejected("the slot's answer changed before it was read", code=code)
        self._release(slot)
        if code == COLLECT_WIDTH:
            raise LayoutMismatch(f"the sidecar's vectors are not {dest.shape[1]} wide, as the model table said "
                                 "when this client attached (the table was changed in shared memory)")
        if code:
            raise slot_error(code)
        return queue_ns, compute_ns

    def _await_answer(self, slot: int, seq: int, cancel: threading.Event | None = None) -> None:
        """Spin, then park: under the spin policy poll the slot from the
        submit on; else block on the semaphore until shortly before the
        sidecar's ETA for the slot, then poll its state for a bounded time;
        if the answer is late, block again. The timer wake-up happens while
        the model still runs, so its cost is hidden. A sidecar that drains
        (a clean stop) still answers what it holds, so that is waited for.
        A set ``cancel`` ends the wait with RequestCancelled at the next wake-up."""
        hot, sem = self.hot, self.sems[slot]
        settings = self.settings
        spin_ns = settings.spin_us * 1000
        if self.spin:
            polled = hot.poll(slot, seq, min(settings.idle_poll_us * 1000, int(settings.timeout_s * 1e9)),
                              spin_ns, SPIN_WAITERS)
            if polled == hotpath.POLL_ANSWERED:
                return
        poll = min(0.05, settings.stale_after_s / 4)
        look = PICKUP_LOOK_S
        deadline = time.monotonic() + settings.timeout_s
        while True:
            timeout = poll
            if spin_ns:
                eta = int(self.eta_ns[slot])
                if eta == ETA_NONE:
                    # Not picked up yet: look again for its ETA, less often the
                    # longer the queue (under load each look is a wasted wake-up).
                    timeout, look = look, min(poll, 2 * look)
                elif eta == ETA_PARK:  # a large batch: its waiters park
                    spin_ns = 0
                else:
                    now = time.monotonic_ns()
                    wake_at = eta - spin_ns
                    if now >= wake_at:
                        if hot.spin_until(slot, seq, eta + 2 * spin_ns):
                            return  # the post is left pending; the next take of the slot drains it
                        spin_ns = 0  # late: park until the post
                        continue
                    timeout = min(poll, (wake_at - now) / 1e9)
            if sem.wait(timeout):
                if hot.answered(slot, seq):
                    return
                _check_cancel(cancel)
                continue  # a stale post from an abandoned request: keep waiting for ours
            if hot.answered(slot, seq):  # answered, but its post was lost
                return
            _check_cancel(cancel)
            region = self.region
            reason = region.unavailable_reason(settings.stale_after_s, thorough=True)
            if reason is not None and region.state_name == "draining":
                # A draining sidecar answers what it holds, unless it died or hangs meanwhile.
                reason = region.liveness_reason(settings.stale_after_s, thorough=True)
            if reason is not None:
                raise SidecarUnavailable(f"while waiting for a result: {reason}", reason=reason)
            if time.monotonic() > deadline:
                raise SidecarTimeout(f"no answer from the sidecar within {settings.timeout_s}s")

    def _reopen_bell(self) -> None:
        """The sidecar replaced a tampered doorbell: post to the new one."""
        with self._q_lock:
            gen = int(self._bell_gen_now)
            if gen == self.bell_gen:
                return
            self._old_bells.append(self.bell)
            self.bell = hotpath.semaphore(self.region.names.bell)
            self.bell_gen = gen

    def give_up_lease(self) -> None:
        """Hand the ring back: free when none of its slots is in the sidecar's
        hands, else ORPHANED, so that the reaper frees it only once the
        sidecar is done with it (a new holder must never share a slot with a
        late answer). Our pid owns the ring, so nobody else writes its owner
        field and no lock is needed (claimers take only owner 0)."""
        rings = self.region.rings
        if rings is None or int(rings[self.ring]["owner_pid"]) != self.pid:
            return
        busy = any(int(self.state[slot]) in _IN_FLIGHT for slot in range(self.params.slots_per_ring))
        rings[self.ring]["owner_pid"] = ORPHANED if busy or self._semaphores_tampered() else 0

    def _semaphores_tampered(self) -> bool:
        """Whether a slot's semaphore holds more posts than requests can
        leave (someone wrote its value in /dev/shm): the ring then goes back
        through the sidecar's reaper, which resets its semaphores, instead
        of straight to the next holder, who would find its slots retired."""
        if self._retired:
            return True
        for sem in self.sems:
            try:
                if sem.value() >= SLOT_DRAIN_LIMIT:
                    return True
            except OSError:  # a value that cannot be read (not on Linux)
                return False
        return False

    # -- users and unmapping ------------------------------------------------------
    # NOTE: never unmap or close a semaphore while a thread may still use them:
    # numpy views of an unmapped segment, or a sem_wait on a closed semaphore,
    # crash the process (SIGSEGV), not raise. So a session is unmapped only by
    # an explicit close(), and only once its last request has left.
    def enter(self) -> None:
        with self._use_lock:
            if self._closing:
                raise SidecarUnavailable("the client's session was closed", reason="closed")
            self._users += 1

    def leave(self) -> None:
        with self._use_lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            self._finish()

    def close(self) -> None:
        """Give the lease up and unmap, once the last request inside has
        left: a request still running keeps writing its ring's slots, so the
        ring must not reach a new holder before it is done."""
        with self._use_lock:
            if self._closing:
                return
            self._closing = True
            if self._users:
                return  # the last request to leave finishes the close
        self._finish()

    def _finish(self) -> None:
        self.give_up_lease()
        for sem in [self.bell, *self._old_bells, *self.sems]:
            sem.close()
        self.hot.release()
        self.live.release()
        if self.cache is not None:
            self.cache.close()
        self.slot_views = self.state = self.seq = self.eta_ns = None
        self._bell_gen_now = self.queued = self.hot = self.live = None
        self._key_words = None
        self.region.close()

    def release_in_owner(self) -> None:
        """For a client dropped without close(), or alive at interpreter
        exit: give the lease up, without unmapping (other threads may still
        run at exit), only in the process that leased the ring (a forked
        child's copy must not give the parent's away), and only when no
        request is inside (else the reaper frees it once this process is gone)."""
        if self.pid != os.getpid():
            return
        with self._use_lock:
            if self._closing or self._users:
                return
            self._closing = True
        self.give_up_lease()


#: A NaN no model computes (its payload is ours), as bits: written around
#: where a slot's rows should end (submit) to see how wide the sidecar wrote
#: them (collect): it writes by its own model's size, which a model table
#: changed in shared memory may not tell the client.
ROW_MARK = 0x7FC5E171


def slot_error(code: int) -> Exception:
    """The typed exception of a slot the sidecar answered with ``code``."""
    try:
        err = SlotError(code)
    except ValueError:
        return SlotRejected(f"sidecar failed the request with unknown code {code}", code=code)
    if err == SlotError.MODEL_FAILED:
        return ModelFailed("the model failed on this batch (see the sidecar's log)", code=code)
    if err == SlotError.SHUTDOWN:
        return SidecarUnavailable("the sidecar stopped before serving this request", reason="shutdown")
    return SlotRejected(f"sidecar rejected the request: {err.name}", code=code)
