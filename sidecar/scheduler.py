"""The batching: which READY slots the sidecar serves next, and how.

A :class:`Scheduler` drains the doorbell and scans the slot states, orders
and admits ready slots (fairness, the batch budget), takes and validates
them, plans and runs the model calls, gives waiters their ETAs, publishes
each answer and counts it, and frees the rings of dead workers between
batches. It runs in the sidecar's loop thread only, driven by
:class:`sidecar.server.Sidecar`, which creates and removes every shared
object and hands the scheduler the views, counters and semaphores it uses.
Batch planning itself lives in :mod:`sidecar.planner`, pure and tested
without a model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import posix_ipc
from loguru import logger

from shm_protocol import hotpath
from shm_protocol.config import Settings
from shm_protocol.errors import RingTableBusy
from shm_protocol.layout import (
    BATCH_TEXTS_BUCKETS,
    ETA_PARK,
    LATENCY_BUCKETS_S,
    SLOT_BUSY,
    SLOT_CLAIMED,
    SLOT_FREE,
    SLOT_READY,
    LayoutParams,
    ModelKind,
    RecordViews,
    SlotError,
    SlotViews,
    bucket_index,
    model_stats_view,
)
from shm_protocol.region import Region
from shm_protocol.segments import DEV_SHM, Names, create_semaphore, pid_alive, reset_semaphore
from shm_protocol.session import SLOT_DRAIN_LIMIT

from .cache_writer import CacheWriter
from .call_size import CallSizer
from .planner import CallTimer, admit, fair_order, plan_calls

#: A model call of at least this many padded tokens leaves hundreds of MB of
#: activations in the C heap (a batch of 200 passages: about 300 MB), which
#: glibc keeps. After such a call the scheduler sets ``trim_pending``, and the
#: loop hands the free pages back once it is idle (see sidecar.server.TRIM_IDLE_S).
TRIM_AFTER_TOKENS = 2048

#: A model call is expected to end within this many times its estimate
#: before the loop's deadline passes (calls of one size vary by 2x under load).
CALL_DEADLINE_FACTOR = 4


@dataclass
class _Work:
    """One valid slot taken into the current batch."""

    flat: int
    seq: int  # the slot's generation when taken: the answer is published only to it
    offsets: np.ndarray
    ids: np.ndarray
    texts: int
    queue_ns: int
    model: int = 0
    segments: list[int] | None = None  # pair splits, for a reranker or classifier
    remaining: int = 0
    answered: bool = False
    call_ns: int = 0  # the model calls its texts rode in, together (published as compute_ns)
    cache_keys: np.ndarray | None = None  # its texts' embedding cache keys (a copy), when it sent any
    last_call: int = -1

    def __post_init__(self) -> None:
        self.remaining = self.texts

    def lengths(self) -> list[int]:
        o = self.offsets.tolist()  # plain ints: cheaper than np.diff for the usual few texts
        return [b - a for a, b in zip(o, o[1:])]


class Scheduler:
    """Serves the namespace's READY slots in batches, one :meth:`step` at a
    time, from the sidecar's loop thread (never two threads at once).

    What it is given, it uses but does not create or remove: the region (ring
    table and lock, ``bell_gen``), the slot views (``slot_views``), the stats
    counters (``counters``), the doorbell (``bell``, which it replaces when
    tampered with) and every slot's semaphore. It reports to the loop's owner
    through:

    * ``progress(call_ns=0.0)``: the loop is alive; the next sign of life is
      due within the stall limit plus ``call_ns`` (a model call about to run).
    * ``model_outcome(ok)``: a model call returned (True) or raised (False);
      the owner counts failures in a row to tell a wedged loop.
    * ``log_fault(level, message, *args)``: the rate-limited log of faults
      that a broken or hostile worker can repeat at will.
    """

    def __init__(
        self,
        settings: Settings,
        models: list,
        params: LayoutParams,
        region: Region,
        names: Names,
        *,
        slot_views: SlotViews,
        counters: RecordViews,
        bell,
        flat_sems: list,
        cores: int,
        progress: Callable[..., None],
        model_outcome: Callable[[bool], None],
        log_fault: Callable[..., None],
        cache: CacheWriter | None = None,
    ):
        self.settings = settings
        self.models = models  # loaded models, by their index in the header's table
        self.params = params
        self.region = region
        self.names = names
        self.slot_views = slot_views
        self.counters = counters
        self.bell = bell  # the current doorbell (a hotpath.Sem): _replace_bell swaps it
        self.hot = hotpath.ring(region.slots)  # scan, take and publish in C, over every slot
        self._flat_sems = flat_sems
        self._progress = progress
        self._model_outcome = model_outcome
        self._log_fault = log_fault
        self.cache = cache  # the embedding cache, which answered texts are stored in (None: off)
        self._timers = [CallTimer() for _ in models]  # each model's cost per padded token
        # Each model's texts per call, refined from the texts/s its calls reach
        # (fixed where SHM_EMBED_CALL_ROWS sets it).
        self._sizers = [CallSizer(m.call_rows, settings.max_batch_texts, fixed=settings.call_rows > 0)
                        for m in models]
        # Each model's counters in its table entry, one view per field.
        self._model_counters = [RecordViews(model_stats_view(region.header, i)) for i in range(len(models))]
        self._pairs = [m.info.kind != ModelKind.EMBED for m in models]  # which models take pairs
        self._last_batch_slots = 0
        # How many slots of one batch may have their waiters spin: the cores
        # the model leaves free (a GPU or synthetic model leaves all but this process's).
        uses_cpu = any(m.uses_cpu for m in models)
        model_cores = (settings.torch_threads or cores) if uses_cpu else 1
        self._spin_slots = max(1, cores - model_cores)
        #: A large model call ran since the heap was last trimmed (the loop clears it when it trims).
        self.trim_pending = False
        n_slots = params.n_rings * params.slots_per_ring
        # When the sidecar first saw each READY slot (and that slot's
        # generation then): batches are ordered by this, not by the worker's clock.
        self._seen_ns = np.zeros(n_slots, np.uint64)
        self._seen_seq = np.zeros(n_slots, np.uint64)
        # A drain of the doorbell takes at most this many posts per scan: one
        # per slot is all honest workers can owe it; a hostile process could
        # have pushed it to SEM_VALUE_MAX (minutes to drain).
        self._bell_drain_limit = 4 * n_slots + 64
        self._ready = np.empty(n_slots, np.int64)  # the scan's output

    def call_sizes(self) -> list[str]:
        """Each model's best texts per call by width, as measured so far (for the log)."""
        return [f"{m.info.name}: {sizer.describe()}" for m, sizer in zip(self.models, self._sizers)
                if not sizer.fixed and sizer.describe()]

    # -- waiting for work -------------------------------------------------------------
    def spin_for_bell(self, until_ns: int) -> bool:
        """Poll the doorbell until ``until_ns``: right after a batch the next
        request usually comes within microseconds, and parking would add a
        wake-up of 100 us or more on a virtual machine."""
        return self.bell.spin(until_ns)

    def _scan(self) -> np.ndarray:
        """READY slots now, each stamped with when the sidecar first saw it."""
        # Drain before the scan: a later post wakes the next scan.
        if self.bell.drain(self._bell_drain_limit) >= self._bell_drain_limit:
            try:
                self._replace_bell()
            except Exception as exc:  # keep the old one (drained in bounded steps) and keep serving
                self._log_fault("ERROR", "could not replace the doorbell: {!r}", exc)
        ready = self._ready[: self.hot.scan(self._ready)].copy()
        if len(ready) == 1:  # the common case of a lone request: plain ints, no temporaries
            flat = int(ready[0])
            seq = int(self.slot_views.seq[flat])
            if self._seen_ns[flat] == 0 or self._seen_seq[flat] != seq:
                self._seen_ns[flat] = time.monotonic_ns()
                self._seen_seq[flat] = seq
        elif len(ready):
            seqs = self.slot_views.seq[ready]
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
        settings = self.settings
        self.counters.loop_errors[0] += 1
        self._log_fault("ERROR", "the doorbell holds over {} posts (tampered with); replacing it",
                        self._bell_drain_limit)
        # Create the new doorbell under a spare name, then rename its file
        # over the old one: the name never lacks a doorbell, and a failure
        # (a full /dev/shm) leaves the old one in place.
        new = create_semaphore(self.names.bell_next, 0, mode=settings.ipc_mode, group=settings.group)
        try:
            os.rename(DEV_SHM / f"sem.{self.names.bell_next.lstrip('/')}",
                      DEV_SHM / f"sem.{self.names.bell.lstrip('/')}")
        except OSError:
            new.close()
            posix_ipc.unlink_semaphore(self.names.bell_next)
            raise
        try:
            opened = hotpath.semaphore(self.names.bell)
        finally:
            new.close()  # posix_ipc made it (mode, group); the hot path posts and waits on its own handle
        old, self.bell = self.bell, opened
        old.close()
        self.region.header["bell_gen"] += 1

    # -- one batch --------------------------------------------------------------------
    def step(self) -> bool:
        """Serve one batch of READY slots. Returns False if there was none."""
        ready = self._scan()
        self.counters.ready_slots[0] = len(ready)
        if len(ready) == 0:
            return False
        settings = self.settings
        if settings.max_wait_us and len(ready) < min(self._last_batch_slots, settings.max_batch_texts):
            # Linger only while fewer slots are ready than the last batch held:
            # under steady concurrency the rest arrive within a millisecond or
            # two, and one batch of 8 runs far faster than 8 batches of 1. A
            # lone client (last batch 1) never waits.
            deadline = time.monotonic() + settings.max_wait_us / 1e6
            while len(ready) < self._last_batch_slots and (left := deadline - time.monotonic()) > 0:
                if not self.bell.wait(left):
                    break
                ready = self._scan()
        if len(ready) == 1:
            order = [int(ready[0])]
            model = int(self.slot_views.model[order[0]])
        else:
            order = fair_order(ready, self._seen_ns[ready], self.params.slots_per_ring)
            # One model per batch: the oldest slot's; the others' slots keep
            # their place (their age) for the next rounds. Filtered with one
            # model too: a slot naming no model is refused in a batch of its own.
            model = int(self.slot_views.model[order[0]])
            models = self.slot_views.model[order]
            if (models != model).any():
                order = [f for f, m in zip(order, models.tolist()) if m == model]
        batch = admit(order, self.slot_views.n_texts, self.slot_views.n_tokens, settings.max_batch_texts,
                      settings.admit_tokens)
        works: list[_Work] = []
        try:
            self._take(batch, works, model)
            if works:
                self._serve_batch(works, model)
        finally:
            # Whatever happened, no slot of this batch stays BUSY: the reaper
            # and the lease rules rely on BUSY ending with the step.
            for work in works:
                if not work.answered:
                    self._finish(work, SlotError.MODEL_FAILED)
            self.counters.busy_slots[0] = 0
        return True

    def _take(self, batch: list[int], works: list[_Work], model: int) -> None:
        """Mark the batch's slots BUSY and validate each on a private copy
        (for ``model``, which every slot of the batch must name); a bad slot
        is answered with its error at once and never joins. Valid ones go
        into ``works``, the caller's list, as soon as they are BUSY (so the
        caller answers them whatever happens after)."""
        params, views, hot = self.params, self.slot_views, self.hot
        info = self.models[model].info if 0 <= model < len(self.models) else None
        pairs = self._pairs[model] if info is not None else False
        t0 = time.monotonic_ns()
        for flat in batch:
            queue_ns = max(0, t0 - int(self._seen_ns[flat]))
            self._seen_ns[flat] = 0
            try:
                if info is None:  # the batch's model is no served model: refused as a whole
                    seq = int(views.seq[flat])
                    hot.set_state(flat, SLOT_BUSY)
                    code, n_texts, ids, offs, splits = SlotError.BAD_MODEL, 0, None, None, None
                else:
                    # Taken BUSY, copied out and checked in C, each value read once (hotpath_c/ring.c's take).
                    code, seq, n_texts, ids, offs, splits = hot.take(flat, model, info.max_seq_length,
                                                                     info.vocab_size, pairs)
                    code = SlotError(code)
            except Exception as exc:  # a slot's bytes must not be able to raise out of here
                self.counters.loop_errors[0] += 1
                self._log_fault("ERROR", "taking slot {} raised {!r}", flat, exc)
                seq = int(views.seq[flat])
                hot.set_state(flat, SLOT_BUSY)
                code, n_texts, ids, offs, splits = SlotError.BAD_COUNT, 0, None, None, None
            work = _Work(flat, seq, None, None, n_texts, queue_ns, model)
            if code != SlotError.NONE:
                self._finish(work, code)
                if code != SlotError.CANCELLED:  # its waiter gave up: no model time for it, nothing to log
                    self._log_fault("WARNING", "rejected slot {} (ring {}): {}", flat % params.slots_per_ring,
                                    flat // params.slots_per_ring, code.name)
                continue
            work.offsets = np.frombuffer(offs, np.int64)
            work.ids = np.frombuffer(ids, np.int32)
            work.segments = splits
            if self.cache is not None and not pairs:
                work.cache_keys = self.cache.keys_of(views.cache_keys[flat, :n_texts])
            works.append(work)

    def _serve_batch(self, works: list[_Work], model: int) -> None:
        counters = self.counters
        counters.busy_slots[0] = len(works)
        self._last_batch_slots = len(works)
        if len(works) == 1 and works[0].texts == 1:
            self._serve_one(works[0], model)
            return
        t0 = time.monotonic_ns()
        plan = plan_calls([w.lengths() for w in works], min(self.settings.call_tokens,
                                                              self.models[model].capacity_tokens),
                          self._sizers[model].rows)
        if len(works) > self._spin_slots:
            # More waiters than spare cores: spinning ones would take the
            # model's cores, so they park until the post.
            self.slot_views.eta_ns[[w.flat for w in works]] = ETA_PARK
        else:
            etas = self._timers[model].etas(plan, len(works), t0)
            if etas is not None:
                for work, eta in zip(works, etas):
                    self.slot_views.eta_ns[work.flat] = eta
        for ci, (start, end, width) in enumerate(plan.calls):
            chunk = plan.items[start:end]
            seqs = [works[wi].ids[works[wi].offsets[i]: works[wi].offsets[i + 1]] for _, wi, i in chunk]
            segs = None
            if any(works[wi].segments is not None for _, wi, _ in chunk):
                segs = [works[wi].segments[i] if works[wi].segments is not None else 0 for _, wi, i in chunk]
            try:
                vecs, call_ns = self._call(model, seqs, segs, width)
            except Exception as exc:  # a model failure fails these slots, not the sidecar
                self._model_failed(exc, {works[wi].flat: works[wi] for _, wi, _ in chunk}.values(), t0)
                continue
            # (work index, text index in it, row of vecs) of each text still waited for
            live = [(wi, i, k) for k, (_, wi, i) in enumerate(chunk) if not works[wi].answered]
            if len(live) == 1:  # a lone text: no index arrays
                work_i, text_i, row_i = live[0]
                self.slot_views.out[works[work_i].flat, text_i, :vecs.shape[1]] = vecs[row_i]
            elif live:
                flats = np.fromiter((works[wi].flat for wi, _, _ in live), dtype=np.int64, count=len(live))
                rows = np.fromiter((i for _, i, _ in live), dtype=np.int64, count=len(live))
                self.slot_views.out[flats, rows, :vecs.shape[1]] = (vecs[[k for _, _, k in live]]
                                                                    if len(live) < len(chunk) else vecs)
            finished = []
            for _, work_i, _ in chunk:
                work = works[work_i]
                if not work.answered:
                    if work.last_call != ci:
                        work.last_call = ci
                        work.call_ns += call_ns
                    work.remaining -= 1
                    if work.remaining == 0:
                        finished.append(work)
            # Answer first, count after: the waiters should not wait on our bookkeeping.
            published = [w for w in finished if self._publish(w, SlotError.NONE, w.call_ns, len(plan.items))]
            self._account(model, end - start, width, call_ns)
            for work in published:
                self._count(work, SlotError.NONE)
            if self.cache is not None:
                self._cache_answers(model, [(works[wi], i, k) for k, (_, wi, i) in enumerate(chunk)], vecs)

    def _serve_one(self, work: _Work, model: int) -> None:
        """The batch of a lone one-text request (the latency floor): the same
        steps as _serve_batch without planning, sorting or index arrays."""
        t0 = time.monotonic_ns()
        width = len(work.ids)
        # One waiter never outnumbers the spare cores (at least one): it gets an ETA.
        est = self._timers[model].estimate(1, width)
        if est is not None:
            self.slot_views.eta_ns[work.flat] = t0 + int(est)
        try:
            vecs, work.call_ns = self._call(model, [work.ids], work.segments, width)
        except Exception as exc:
            self._model_failed(exc, (work,), t0)
            return
        self.slot_views.out[work.flat, 0, :vecs.shape[1]] = vecs[0]
        published = self._publish(work, SlotError.NONE, work.call_ns, 1)
        self._account(model, 1, width, work.call_ns)
        if published:
            self._count(work, SlotError.NONE)
        if self.cache is not None:
            self._cache_answers(model, [(work, 0, 0)], vecs)

    def _cache_answers(self, model: int, rows: list, vecs: np.ndarray) -> None:
        """Store answered texts (``rows``: work, text index, row of ``vecs``)
        in the embedding cache, after their waiters have them."""
        dim = self.models[model].info.dim
        try:
            for work, text_i, row_i in rows:
                if work.cache_keys is not None:
                    text_tokens = int(work.offsets[text_i + 1] - work.offsets[text_i])
                    self.cache.store(work.cache_keys[text_i], model, dim, text_tokens, vecs[row_i])
        except Exception as exc:  # the cache must not be able to fail the loop
            self.counters.loop_errors[0] += 1
            self._log_fault("ERROR", "storing answers in the embedding cache raised {!r}", exc)

    def _call(self, model: int, seqs: list[np.ndarray], segments: list[int] | None,
              width: int) -> tuple[np.ndarray, int]:
        """One call of model ``model`` on ``seqs`` (padded to ``width``; a
        reranker's pairs split at ``segments``) under the loop's deadline;
        returns the vectors (or scores) and the call's nanoseconds (which the
        caller counts with _account once it has answered)."""
        rows = len(seqs)
        timer = self._timers[model]
        est = timer.estimate(rows, width)
        self._progress(CALL_DEADLINE_FACTOR * est if est is not None else self.settings.model_call_max_s * 1e9)
        c0 = time.monotonic_ns()
        vecs = self.models[model].embed(seqs, segments) if segments is not None else self.models[model].embed(seqs)
        call_ns = time.monotonic_ns() - c0
        self._model_outcome(True)  # first: a loop counted as wedged may show progress again
        self._progress()
        timer.record(rows, width, call_ns)
        self._sizers[model].record(rows, width, call_ns / 1e9)
        return vecs, call_ns

    def _account(self, model: int, rows: int, width: int, call_ns: int) -> None:
        counters = self.counters
        padded = rows * width
        counters.batches[0] += 1
        counters.padded_tokens[0] += padded
        model_counters = self._model_counters[model]
        model_counters.batches[0] += 1
        model_counters.padded_tokens[0] += padded
        model_counters.compute_ns_sum[0] += call_ns
        if padded >= TRIM_AFTER_TOKENS:
            self.trim_pending = True
        counters.batch_texts_hist[bucket_index(rows, BATCH_TEXTS_BUCKETS)] += 1
        counters.compute_hist[bucket_index(call_ns / 1e9, LATENCY_BUCKETS_S)] += 1
        counters.compute_ns_sum[0] += call_ns

    def _model_failed(self, exc: Exception, works, t0: int) -> None:
        """A model call raised: its slots fail (MODEL_FAILED), the sidecar goes on."""
        self._model_outcome(False)
        works = [work for work in works if not work.answered]
        self._log_fault("ERROR", "model failed on a batch of {} requests: {!r}", len(works), exc)
        for work in works:
            self._finish(work, SlotError.MODEL_FAILED, time.monotonic_ns() - t0)

    # -- answers ----------------------------------------------------------------------
    def _finish(self, work: _Work, code: SlotError, compute_ns: int = 0) -> None:
        if self._publish(work, code, compute_ns, 0):
            self._count(work, code)

    def _publish(self, work: _Work, code: SlotError, compute_ns: int, batch_texts: int) -> bool:
        """Publish a slot's outcome, only to the request it was taken for.
        NOTE: fields, then state, then post. Returns whether it was published."""
        work.answered = True
        flat = work.flat
        published, posted = self.hot.publish(flat, work.seq, int(code), work.queue_ns, compute_ns, batch_texts,
                                             self._flat_sems[flat])
        if not published:
            # Its owner wrote the slot while it was in the model (a hostile or
            # broken worker; the lease rules keep honest ones out): the answer
            # belongs to nobody now.
            self.counters.stale_answers[0] += 1
            self._log_fault("WARNING", "slot {} changed generation while in the model; answer dropped", flat)
            return False
        if not posted:
            # E.g. EOVERFLOW: someone pushed the semaphore to its maximum. The
            # state is published; the waiter finds it at its next poll.
            self.counters.loop_errors[0] += 1
            self._log_fault("ERROR", "posting slot {}'s semaphore failed", flat)
        return True

    def _count(self, work: _Work, code: SlotError) -> None:
        counters = self.counters
        model_counters = self._model_counters[work.model] if 0 <= work.model < len(self._model_counters) else None
        if code == SlotError.NONE:
            counters.requests[0] += 1
            counters.texts[0] += work.texts
            counters.tokens[0] += len(work.ids)
            counters.queue_ns_sum[0] += work.queue_ns
            counters.queue_hist[bucket_index(work.queue_ns / 1e9, LATENCY_BUCKETS_S)] += 1
            model_counters.requests[0] += 1
            model_counters.texts[0] += work.texts
            model_counters.tokens[0] += len(work.ids)
            model_counters.queue_ns_sum[0] += work.queue_ns
        else:
            counters.errors[int(code)] += 1
            if model_counters is not None:
                model_counters.errors[0] += 1

    def refuse_ready(self) -> None:
        """Answer every READY slot SHUTDOWN: the sidecar stops before it could
        serve them (its state already says so, so no new ones come)."""
        views = self.slot_views
        for flat in np.flatnonzero(views.state == SLOT_READY).tolist():
            views.state[flat] = SLOT_BUSY
            self._finish(_Work(flat, int(views.seq[flat]), None, np.empty(0, np.int32), 0, 0, int(views.model[flat])),
                         SlotError.SHUTDOWN)

    # -- rings of dead workers ----------------------------------------------------------
    def reap_dead_rings(self) -> int:
        """Free rings whose owner died or gave them up with slots in flight
        (ORPHANED, also set by Gunicorn's child_exit). Runs in the loop thread
        between batches, so none of the ring's slots is BUSY while it is reset.
        Never waits for the ring-table lock: a holder that is stopped would
        stop the loop with it; the reaper tries again next round."""
        rings = self.region.rings
        owners = rings["owner_pid"]
        suspects = [ring for ring in np.flatnonzero(owners != 0).tolist()
                    if int(owners[ring]) < 0 or not pid_alive(int(owners[ring]))]
        if not suspects:
            return 0
        spr = self.params.slots_per_ring
        try:
            with self.region.lock_rings(timeout=0):
                for ring in suspects:
                    owner = int(owners[ring])
                    if owner > 0 and pid_alive(owner):
                        continue
                    for slot in range(spr):
                        flat = ring * spr + slot
                        if int(self.slot_views.state[flat]) in (SLOT_READY, SLOT_CLAIMED):
                            self.counters.errors[SlotError.REAPED] += 1
                        self.slot_views.state[flat] = SLOT_FREE
                        self._seen_ns[flat] = 0
                    if not self._reset_ring_semaphores(ring):
                        continue  # out of the pool until a later round manages it
                    rings[ring]["owner_pid"] = 0
                    self.counters.rings_reaped[0] += 1
                    logger.info("reaped ring {} of {}", ring, "a closed client" if owner < 0 else f"dead pid {owner}")
        except RingTableBusy:
            self._log_fault("WARNING", "ring table locked by another process; reaping {} ring(s) later",
                            len(suspects))
            return 0
        return len(suspects)

    def _reset_ring_semaphores(self, ring: int) -> bool:
        """Empty ring ``ring``'s slot semaphores before the ring is leased again:
        posts left by its last holder's abandoned requests are drained; a
        semaphore someone pushed towards SEM_VALUE_MAX (through /dev/shm) is
        replaced by a new one under the same name, else every later holder
        of the ring would find its slots retired. False if one could not be
        replaced (the ring then stays out of the pool)."""
        settings, spr = self.settings, self.params.slots_per_ring
        for slot in range(spr):
            flat = ring * spr + slot
            old = self._flat_sems[flat]
            try:
                new = reset_semaphore(old, self.names.slot(ring, slot), SLOT_DRAIN_LIMIT, mode=settings.ipc_mode,
                                      group=settings.group)
            except Exception as exc:  # e.g. a full /dev/shm: keep serving, retry next round
                self.counters.loop_errors[0] += 1
                self._log_fault("ERROR", "could not reset slot {}'s semaphore of ring {}: {!r}", slot, ring, exc)
                return False
            if new is not old:
                self._flat_sems[flat] = new  # the list the sidecar closes on stop, too
                self.counters.loop_errors[0] += 1
                self._log_fault("ERROR", "slot {} of ring {}: its semaphore held {} posts or more (tampered "
                                "with); reset it to a new one", slot, ring, SLOT_DRAIN_LIMIT)
        return True
