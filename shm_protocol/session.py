"""A process's lease on one ring of one sidecar epoch: its slots, their
semaphores and the doorbell; taking, submitting, giving up and handing back.
The lease rules are in :mod:`shm_protocol.layout`'s docstring."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time

import numpy as np
import posix_ipc
from loguru import logger

from .errors import ShmEmbedError, SidecarUnavailable
from .layout import (
    ETA_NONE,
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
from .segments import ORPHANED, drain, open_semaphore, semaphore_value

#: Posts a slot's semaphore may legitimately hold before a submit: one per
#: abandoned request at most. More means someone wrote the semaphore's value
#: in /dev/shm; draining up to SEM_VALUE_MAX would take minutes, so the slot
#: is retired instead.
SLOT_DRAIN_LIMIT = 64

#: A doorbell that cannot be rung fails every submit until it is replaced: one line per 5 s.
_log_bell_failure = RateLimitedLog()

#: Slot states in which the sidecar may still read or write the slot.
_IN_FLIGHT = (SLOT_CLAIMED, SLOT_READY, SLOT_BUSY)


class Session:
    """This process's lease on one ring of one sidecar epoch."""

    def __init__(self, region: Region, ring: int, models: list[ModelEntry] | None = None):
        self.region = region
        self.ring = ring
        self.pid = os.getpid()
        self.epoch = region.epoch
        names = region.names
        p = region.params
        self.params = p
        self.bell = open_semaphore(names.bell)
        self._bell_gen_now = region.header["bell_gen"]  # a view: the sidecar bumps it
        self.bell_gen = int(self._bell_gen_now)
        self.sems = [open_semaphore(names.slot(ring, s)) for s in range(p.slots_per_ring)]
        self.v = SlotViews(region.slots[ring])
        self.spin = int(region.header["wait_policy"]) == WaitPolicy.SPIN
        self.queued = RecordViews(region.header["stats"]).ready_slots  # the sidecar's queue depth
        self.state, self.seq, self.eta_ns = self.v.state, self.v.seq, self.v.eta_ns
        self.free: queue.Queue[int] = queue.Queue()
        self._seq = itertools.count(int(time.monotonic_ns()))
        self._quarantine: set[int] = set()
        self._retired: set[int] = set()  # slots whose semaphore was tampered with: reset by the reaper
        self._q_lock = threading.Lock()
        self._use_lock = threading.Lock()
        self._users = 0
        self._closing = False
        self._old_bells: list = []  # replaced doorbells, closed with the session (a thread may still post)
        # The model table, fixed for the sidecar's epoch (the caller's checked copy).
        self.models = region.models() if models is None else models
        # Slots whose segment splits are not all zero (a reranker's request was there): cleared before reuse.
        self._segments_dirty = [True] * p.slots_per_ring
        for s in range(p.slots_per_ring):
            # A fresh lease has every slot free; one still in flight (which the
            # lease rules exclude) is kept out of use until the sidecar is done.
            if int(self.state[s]) in _IN_FLIGHT:
                self._quarantine.add(s)
            else:
                self.free.put(s)

    # -- slots --------------------------------------------------------------------
    def take_slot(self, timeout: float | None) -> int | None:
        """A free slot whose semaphore holds no stale post, or None after ``timeout``."""
        deadline = None if timeout is None or timeout <= 0 else time.monotonic() + timeout
        while True:
            self._recover_quarantined()
            try:
                if deadline is None:
                    s = self.free.get_nowait()
                else:
                    s = self.free.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            # A post left by an earlier, abandoned request (bounded: see SLOT_DRAIN_LIMIT).
            if drain(self.sems[s], SLOT_DRAIN_LIMIT) < SLOT_DRAIN_LIMIT:
                return s
            self._retired.add(s)
            logger.error("slot {} of ring {}: its semaphore holds more than {} posts (tampered with); "
                         "the slot is retired", s, self.ring, SLOT_DRAIN_LIMIT)

    def give_back(self, s: int) -> None:
        self.state[s] = SLOT_FREE
        self.free.put(s)

    def quarantine(self, s: int) -> None:
        """An abandoned slot stays out of use until the sidecar has finished with it."""
        with self._q_lock:
            self._quarantine.add(s)

    def _recover_quarantined(self) -> None:
        if not self._quarantine:
            return
        with self._q_lock:
            for s in list(self._quarantine):
                if int(self.state[s]) in (SLOT_DONE, SLOT_ERROR, SLOT_FREE):
                    self._quarantine.discard(s)
                    self.give_back(s)

    def abandon(self, s: int) -> None:
        """A request left slot ``s`` on an error: free it if the sidecar never
        saw it, else keep it out of use until the sidecar is done with it."""
        if int(self.state[s]) in (SLOT_FREE, SLOT_CLAIMED):
            self.give_back(s)
        else:
            self.give_up(s, int(self.seq[s]))

    def give_up(self, s: int, seq: int) -> None:
        """Nobody waits for slot ``s``'s answer to generation ``seq`` any more:
        the sidecar may skip it (cancel), and the slot stays out of use until
        the sidecar is done with it."""
        self.v.cancel[s] = seq
        self.quarantine(s)

    def answered(self, s: int, seq: int) -> bool:
        return int(self.state[s]) in (SLOT_DONE, SLOT_ERROR) and int(self.seq[s]) == seq

    def submit(self, s: int, ids: np.ndarray | list[int], lengths: np.ndarray, model: int = 0,
               segments: np.ndarray | None = None) -> int:
        """Write one part of a request for model ``model`` into slot ``s``
        (``segments``: where each pair's second part starts, for a reranker)
        and ring the doorbell."""
        v = self.v
        n = len(lengths)
        ntok = len(ids)
        v.state[s] = SLOT_CLAIMED
        v.tokens[s, :ntok] = ids
        offs = v.offsets[s]
        offs[0] = 0
        if n == 1:
            offs[1] = ntok
        else:
            offs[1 : n + 1] = np.cumsum(lengths)
        if segments is not None:
            v.segments[s, :n] = segments
        elif self._segments_dirty[s]:
            v.segments[s, :] = 0
        self._segments_dirty[s] = segments is not None
        v.model[s] = model
        v.n_texts[s] = n
        v.n_tokens[s] = ntok
        seq = next(self._seq)
        v.seq[s] = seq
        v.error[s] = SlotError.NONE
        v.eta_ns[s] = ETA_NONE
        v.submit_ns[s] = time.monotonic_ns()
        # NOTE: state after payload, doorbell after state (see layout's docstring).
        v.state[s] = SLOT_READY
        try:
            if int(self._bell_gen_now) != self.bell_gen:
                self._reopen_bell()
            self.bell.release()
        except (posix_ipc.Error, OSError, ValueError, ShmEmbedError) as exc:
            # E.g. EOVERFLOW on a doorbell someone pushed to its maximum. The
            # post is only a wake-up: the sidecar scans slot states at least
            # once per heartbeat interval and finds this READY slot anyway.
            _log_bell_failure("WARNING", "could not ring the sidecar's doorbell ({!r}); it will find the "
                              "request at its next scan", exc)
        return seq

    def _reopen_bell(self) -> None:
        """The sidecar replaced a tampered doorbell: post to the new one."""
        with self._q_lock:
            gen = int(self._bell_gen_now)
            if gen == self.bell_gen:
                return
            self._old_bells.append(self.bell)
            self.bell = open_semaphore(self.region.names.bell)
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
        busy = any(int(self.state[s]) in _IN_FLIGHT for s in range(self.params.slots_per_ring))
        rings[self.ring]["owner_pid"] = ORPHANED if busy or self._semaphores_tampered() else 0

    def _semaphores_tampered(self) -> bool:
        """Whether a slot's semaphore holds more posts than requests can
        leave (someone wrote its value in /dev/shm): the ring then goes back
        through the sidecar's reaper, which resets its semaphores, instead
        of straight to the next holder, who would find its slots retired."""
        if self._retired:
            return True
        for sem in self.sems:
            value = semaphore_value(sem)
            if value is not None and value >= SLOT_DRAIN_LIMIT:
                return True
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
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        self.v = self.state = self.seq = self.eta_ns = self._bell_gen_now = self.queued = None
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
