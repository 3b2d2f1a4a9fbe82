"""The sidecar: owns the namespace's objects and runs the batching loop.

One thread runs the loop (scan, validate, batch, embed, answer, reap); a
second one only writes the heartbeat, so a long batch never looks like a hung
sidecar while a stopped process (SIGSTOP) does.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import posix_ipc
from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.errors import LayoutMismatch, NamespaceInUse, SidecarUnavailable
from shm_protocol.layout import (
    ETA_PARK,
    BATCH_TEXTS_BUCKETS,
    LATENCY_BUCKETS_S,
    LayoutParams,
    SidecarState,
    SlotError,
    SLOT_BUSY,
    SLOT_CLAIMED,
    SLOT_DONE,
    SLOT_ERROR,
    SLOT_FREE,
    SLOT_READY,
    bucket_index,
)
from shm_protocol.region import Region
from shm_protocol.segments import (
    Names,
    create_semaphore,
    drain,
    pid_alive,
    ring_table_lock,
    unlink_namespace,
)

#: A model call of at least this many padded tokens leaves hundreds of MB of
#: activations in the C heap (a batch of 200 passages: about 300 MB), which
#: glibc keeps. After such a call, once no work has come for TRIM_IDLE_S, the
#: loop hands the free pages back (malloc_trim: about 20 ms, only when idle).
TRIM_AFTER_TOKENS = 2048
TRIM_IDLE_S = 0.05


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


from .model import Embedder


def validate_slot(n_texts: int, n_tokens: int, offsets: np.ndarray, tokens: np.ndarray, p: LayoutParams):
    """Check what a worker wrote. Returns (SlotError, lengths, private copy of
    the ids). The ids are copied out of shared memory *before* they are
    checked, so a writer cannot change them between check and use."""
    if not (1 <= n_texts <= p.max_texts) or not (1 <= n_tokens <= p.max_tokens):
        return SlotError.BAD_COUNT, None, None
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
    offsets: np.ndarray
    ids: np.ndarray
    remaining: int
    queue_ns: int
    texts: int = field(init=False)

    def __post_init__(self) -> None:
        self.texts = self.remaining


def _watchdog_seconds() -> float:
    """systemd's watchdog interval for this process, or 0 when none is set."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


class Sidecar:
    """Creates the namespace, serves it until stopped, then removes it."""

    def __init__(self, settings: Settings, embedder: Embedder, *, notify: Callable[[str], None] | None = None):
        self.settings = settings
        self.embedder = embedder
        self.names = Names(settings.namespace)
        self.notify = notify or (lambda msg: None)
        self._stop = threading.Event()
        # Running estimate of one model call's time, by power-of-two bucket of
        # padded tokens: it gives each slot an ETA that workers time their
        # spin-polling by.
        self._call_ns: dict[int, float] = {}
        self._last_batch_slots = 0
        # How many slots of one batch may have their waiters spin: the cores
        # the model leaves free (a GPU model leaves all but this process's).
        cores = os.cpu_count() or 1
        model_cores = 1 if getattr(embedder, "is_cuda", False) else (settings.torch_threads or cores)
        self._spin_slots = max(1, cores - model_cores)
        self._trim_pending = False  # a large model call ran since the heap was last trimmed
        self._tick = time.monotonic()  # last sign of life of the batching loop
        self.region: Region | None = None
        self.epoch = 0

    # -- lifecycle --------------------------------------------------------------------
    def request_stop(self) -> None:
        """Safe from a signal handler: sets a flag, nothing else."""
        self._stop.set()

    def reap_stale_namespace(self) -> None:
        """Remove objects of a crashed earlier sidecar of this namespace;
        refuse to start if a live one still serves it."""
        try:
            old = Region.attach(self.names, readonly=True, with_data=False)
        except SidecarUnavailable:
            old = None
        except LayoutMismatch as exc:
            logger.warning("replacing objects of another layout in {}: {}", self.names.namespace, exc)
            old = None
        if old is not None:
            pid, state = old.sidecar_pid, old.state
            old.close()
            if pid != os.getpid() and state != SidecarState.STOPPED and pid_alive(pid):
                raise NamespaceInUse(
                    f"sidecar pid {pid} already serves namespace {self.names.namespace!r}; "
                    "stop it or set another SHM_EMBED_NAMESPACE"
                )
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
        self.reap_stale_namespace()
        region = Region.create(self.names, params, mode=s.ipc_mode, group=s.group)
        self.region = region
        try:
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
        h = region.header
        region.set_text_field("model_name", info.name)
        region.set_text_field("tokenizer_path", info.tokenizer_path)
        region.set_text_field("device", info.device)
        h["max_batch_tokens"] = s.max_batch_tokens
        h["max_batch_texts"] = s.max_batch_texts
        h["sidecar_pid"] = os.getpid()
        self.epoch = int.from_bytes(os.urandom(8), "little") >> 1 | 1
        h["epoch"] = self.epoch
        region.epoch = self.epoch
        h["started_ns"] = time.time_ns()
        h["heartbeat_ns"] = time.monotonic_ns()
        # Flat views over all slots, built once for the loop.
        sl = region.slots.reshape(-1)
        self.v_state = sl["state"]
        self.v_error = sl["error"]
        self.v_ntexts = sl["n_texts"]
        self.v_ntokens = sl["n_tokens"]
        self.v_submit = sl["submit_ns"]
        self.v_queue = sl["queue_ns"]
        self.v_compute = sl["compute_ns"]
        self.v_eta = sl["eta_ns"]
        self.v_batch = sl["batch_texts"]
        self.v_offsets = sl["offsets"]
        self.v_tokens = sl["tokens"]
        self.v_out = sl["out"]
        self.stats = h["stats"]
        h["state"] = SidecarState.READY  # last: workers may attach from here on
        mb = (params.ctl_bytes + params.data_bytes) / 2**20
        logger.info(
            "serving namespace {} epoch {:x}: {} rings x {} slots ({} texts / {} tokens each), {:.1f} MiB",
            self.names.namespace, self.epoch, params.n_rings, params.slots_per_ring,
            params.max_texts, params.max_tokens, mb,
        )

    def destroy(self) -> None:
        """Unlink everything this sidecar created and unmap."""
        for sem in getattr(self, "flat_sems", []):
            sem.close()
        if getattr(self, "bell", None) is not None:
            self.bell.close()
        unlink_namespace(self.names)
        if self.region is not None:
            self.v_state = self.v_error = self.v_ntexts = self.v_ntokens = None
            self.v_submit = self.v_queue = self.v_compute = self.v_eta = self.v_batch = None
            self.v_offsets = self.v_tokens = self.v_out = self.stats = None
            self.region.close()
            self.region = None

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

    def _heartbeat_loop(self) -> None:
        """Publish the heartbeat; feed systemd's watchdog only while the
        batching loop makes progress (a wedged loop then gets restarted)."""
        header = self.region.header
        interval = self.settings.heartbeat_s
        wd_s = _watchdog_seconds()
        next_wd = 0.0
        while not self._stop.wait(interval):
            header["heartbeat_ns"] = time.monotonic_ns()
            now = time.monotonic()
            if wd_s and now >= next_wd and now - self._tick < wd_s / 2:
                self.notify("WATCHDOG=1")
                next_wd = now + wd_s / 4

    # -- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        interval = self.settings.heartbeat_s
        spin_ns = self.settings.spin_us * 1000
        next_reap = 0.0
        idle = True
        last_work_ns = 0
        trim = _malloc_trim()
        while not self._stop.is_set():
            self._tick = time.monotonic()
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
                self.reap_dead_rings()
                next_reap = now + interval
            idle = not self.step()
            if not idle:
                last_work_ns = time.monotonic_ns()

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

    def step(self) -> bool:
        """Serve one batch of READY slots. Returns False if there was none."""
        drain(self.bell)  # before the scan: a later post wakes the next scan
        ready = np.flatnonzero(self.v_state == SLOT_READY)
        self.stats["ready_slots"] = len(ready)
        if len(ready) == 0:
            return False
        wait_us = self.settings.max_wait_us
        if wait_us and len(ready) < min(self._last_batch_slots, self.settings.max_batch_texts):
            # Linger only while fewer slots are ready than the last batch held:
            # under steady concurrency the rest arrive within a millisecond or
            # two, and one batch of 8 runs far faster than 8 batches of 1. A
            # lone client (last batch 1) never waits.
            deadline = time.monotonic() + wait_us / 1e6
            while len(ready) < self._last_batch_slots and (left := deadline - time.monotonic()) > 0:
                try:
                    self.bell.acquire(left)
                except (posix_ipc.BusyError, posix_ipc.SignalError):
                    break
                drain(self.bell)
                ready = np.flatnonzero(self.v_state == SLOT_READY)
        ready = ready[np.argsort(self.v_submit[ready], kind="stable")]  # oldest first
        self._serve_batch(ready)
        return True

    def _take(self, ready: np.ndarray, t0: int) -> list[_Work]:
        """Mark slots BUSY within the batch budget, validate each; a bad slot
        is answered with its error at once and never joins the batch."""
        s, p = self.settings, self.params
        works: list[_Work] = []
        texts = tokens = 0
        for flat in ready.tolist():
            n_texts, n_tokens = int(self.v_ntexts[flat]), int(self.v_ntokens[flat])
            if works and (texts + n_texts > s.max_batch_texts or tokens + n_tokens > s.max_batch_tokens):
                break
            self.v_state[flat] = SLOT_BUSY
            code, offs, ids = validate_slot(n_texts, n_tokens, self.v_offsets[flat], self.v_tokens[flat], p)
            if code != SlotError.NONE:
                self._finish(flat, code, 0, 0)
                logger.warning("rejected slot {} (ring {}): {}", flat % p.slots_per_ring,
                               flat // p.slots_per_ring, code.name)
                continue
            queue_ns = max(0, t0 - int(self.v_submit[flat]))
            works.append(_Work(flat, offs, ids, n_texts, queue_ns))
            texts += n_texts
            tokens += n_tokens
        return works

    def _serve_batch(self, ready: np.ndarray) -> None:
        t0 = time.monotonic_ns()
        works = self._take(ready, t0)
        if not works:
            return
        self.stats["busy_slots"] = len(works)
        self._last_batch_slots = len(works)
        # Every text of the batch, longest first, cut into model calls that fit
        # the padded-token budget: sorting by length keeps padding small.
        items = [(int(w.offsets[i + 1] - w.offsets[i]), wi, i) for wi, w in enumerate(works) for i in range(w.texts)]
        items.sort(key=lambda t: -t[0])
        budget = min(self.settings.max_batch_tokens, self.embedder.capacity_tokens)
        budget = max(budget, items[0][0])
        max_texts = self.settings.max_batch_texts
        calls, start = [], 0
        while start < len(items):
            width = items[start][0]
            end = start + max(1, min(max_texts, budget // width))
            calls.append((start, min(end, len(items)), width))
            start = end
        est = [self._call_ns.get(((b - a) * w).bit_length()) for a, b, w in calls]
        if len(works) > self._spin_slots:
            # More waiters than spare cores: spinning ones would take the
            # model's cores, so they park until the post.
            self.v_eta[[w.flat for w in works]] = ETA_PARK
        elif all(e is not None for e in est):
            # A slot is answered after the call that holds its last text.
            ends = np.cumsum(est)
            last_call = {}
            for ci, (a, b, _) in enumerate(calls):
                for _, wi, _ in items[a:b]:
                    last_call[wi] = ci
            for wi, ci in last_call.items():
                self.v_eta[works[wi].flat] = t0 + int(ends[ci])
        st = self.stats
        for start, end, width in calls:
            chunk = items[start:end]
            seqs = [works[wi].ids[works[wi].offsets[i]: works[wi].offsets[i + 1]] for _, wi, i in chunk]
            c0 = time.monotonic_ns()
            self._tick = c0 / 1e9
            try:
                vecs = self.embedder.embed(seqs)
            except Exception as exc:  # a model failure fails these slots, not the sidecar
                logger.exception("model failed on a batch of {} texts: {}", len(chunk), exc)
                for w in {works[wi].flat: works[wi] for _, wi, _ in chunk}.values():
                    if w.remaining > 0:
                        w.remaining = -1
                        self._finish(w.flat, SlotError.MODEL_FAILED, w.queue_ns, time.monotonic_ns() - t0)
                continue
            c1 = time.monotonic_ns()
            key = (len(chunk) * width).bit_length()
            prev = self._call_ns.get(key)
            self._call_ns[key] = (c1 - c0) if prev is None else 0.8 * prev + 0.2 * (c1 - c0)
            flats = np.fromiter((works[wi].flat for _, wi, _ in chunk), dtype=np.int64, count=len(chunk))
            rows = np.fromiter((i for _, _, i in chunk), dtype=np.int64, count=len(chunk))
            self.v_out[flats, rows] = vecs
            st["batches"] += 1
            st["padded_tokens"] += len(chunk) * width
            if len(chunk) * width >= TRIM_AFTER_TOKENS:
                self._trim_pending = True
            st["batch_texts_hist"][bucket_index(len(chunk), BATCH_TEXTS_BUCKETS)] += 1
            st["compute_hist"][bucket_index((c1 - c0) / 1e9, LATENCY_BUCKETS_S)] += 1
            st["compute_ns_sum"] += c1 - c0
            done_at = time.monotonic_ns()
            finished = []
            for _, wi, _ in chunk:
                w = works[wi]
                if w.remaining > 0:
                    w.remaining -= 1
                    if w.remaining == 0:
                        finished.append(w)
            # Answer first, count after: the waiters should not wait on our bookkeeping.
            for w in finished:
                self._publish(w.flat, SlotError.NONE, w.queue_ns, done_at - t0, len(items))
            for w in finished:
                self._count(w.flat, SlotError.NONE, w.queue_ns)
        self.stats["busy_slots"] = 0

    def _finish(self, flat: int, code: SlotError, queue_ns: int, compute_ns: int) -> None:
        self._publish(flat, code, queue_ns, compute_ns, 0)
        self._count(flat, code, queue_ns)

    def _publish(self, flat: int, code: SlotError, queue_ns: int, compute_ns: int, batch_texts: int) -> None:
        """Publish a slot's outcome. NOTE: fields, then state, then post."""
        self.v_error[flat] = code
        self.v_queue[flat] = queue_ns
        self.v_compute[flat] = compute_ns
        self.v_batch[flat] = batch_texts
        self.v_state[flat] = SLOT_DONE if code == SlotError.NONE else SLOT_ERROR
        self.flat_sems[flat].release()

    def _count(self, flat: int, code: SlotError, queue_ns: int) -> None:
        st = self.stats
        if code == SlotError.NONE:
            st["requests"] += 1
            st["texts"] += int(self.v_ntexts[flat])
            st["tokens"] += int(self.v_ntokens[flat])
            st["queue_ns_sum"] += queue_ns
            st["queue_hist"][bucket_index(queue_ns / 1e9, LATENCY_BUCKETS_S)] += 1
        else:
            st["errors"][int(code)] += 1

    # -- rings of dead workers ----------------------------------------------------------
    def reap_dead_rings(self) -> int:
        """Free rings whose owner died (or was marked orphaned by Gunicorn's
        child_exit). Runs in the loop thread between batches, so none of the
        ring's slots is BUSY while it is reset."""
        rings = self.region.rings
        owners = rings["owner_pid"]
        suspects = [r for r in np.flatnonzero(owners != 0).tolist()
                    if int(owners[r]) < 0 or not pid_alive(int(owners[r]))]
        if not suspects:
            return 0
        spr = self.params.slots_per_ring
        with ring_table_lock(self.names):
            for r in suspects:
                owner = int(owners[r])
                if owner > 0 and pid_alive(owner):
                    continue
                for k in range(spr):
                    flat = r * spr + k
                    if int(self.v_state[flat]) in (SLOT_READY, SLOT_CLAIMED):
                        self.stats["errors"][SlotError.REAPED] += 1
                    self.v_state[flat] = SLOT_FREE
                    drain(self.sems[r][k])
                rings[r]["owner_pid"] = 0
                self.stats["rings_reaped"] += 1
                logger.info("reaped ring {} of dead worker pid {}", r, abs(owner))
        return len(suspects)

    # -- clean stop ---------------------------------------------------------------------
    def _drain(self) -> None:
        """Answer what is in flight, refuse what comes after."""
        header = self.region.header
        header["state"] = SidecarState.DRAINING
        deadline = time.monotonic() + 0.25
        while True:
            served = self.step()
            claimed = bool((self.v_state == SLOT_CLAIMED).any())
            if not served and (not claimed or time.monotonic() > deadline):
                break
            if not served:
                time.sleep(0.001)
        header["state"] = SidecarState.STOPPED
        for flat in np.flatnonzero(self.v_state == SLOT_READY).tolist():
            self.v_state[flat] = SLOT_BUSY
            self._finish(flat, SlotError.SHUTDOWN, 0, 0)
