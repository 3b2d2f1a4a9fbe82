"""A namespace's two segments mapped together, with numpy views built from
the layout. The sidecar creates a Region; workers and the stats reader attach
to one."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import numpy as np

from .errors import LayoutMismatch, RingTableBusy, ShmEmbedError, SidecarUnavailable
from .layout import (
    HEADER_DTYPE,
    LAYOUT_HASH,
    MAGIC,
    MAX_MODELS,
    PROTOCOL_VERSION,
    LayoutParams,
    ModelEntry,
    ModelKind,
    RecordViews,
    SidecarState,
    check_prefix,
    header_view,
    ring_table_view,
    sidecar_state_name,
    slots_view,
)
from .model_files import default_model
from .segments import ORPHANED, Names, Segment, locked, pid_alive

#: Segment ids a reranker's table entry may name at most (BERT has 2).
MAX_TYPE_VOCAB = 16

#: Longest a worker waits for the ring-table lock before RingTableBusy: a
#: holder only keeps it for microseconds, unless it is stopped.
RING_LOCK_TIMEOUT_S = 2.0


class Region:
    """Mapped control and data segments of one namespace."""

    def __init__(self, names: Names, ctl: Segment, data: Segment | None):
        self.names = names
        self._ctl = ctl
        self._data = data
        self.header = header_view(ctl.mm)
        self.hv = RecordViews(self.header)  # per-field views: the liveness check runs on every call
        self.params = LayoutParams.from_header(self.header)
        self.rings = ring_table_view(ctl.mm, self.params.n_rings)
        self.slots = slots_view(data.mm, self.params) if data is not None else None
        self.epoch = int(self.header["epoch"])
        # Threads of one process that share this Region share its descriptor,
        # hence its OFD lock: they take turns here first.
        self._thread_lock = threading.Lock()

    # -- construction -------------------------------------------------------------
    @classmethod
    def create(cls, names: Names, params: LayoutParams, *, mode: int, group: str = "") -> Region:
        """Create both segments (zero-filled) and write the layout header.
        The caller has already unlinked any stale objects of the namespace."""
        ctl = Segment.create(names.ctl, params.ctl_bytes, mode=mode, group=group, keep_fd=True)
        try:
            data = Segment.create(names.data, params.data_bytes, mode=mode, group=group)
        except BaseException:
            ctl.close()
            raise
        header = header_view(ctl.mm)
        header["version"] = PROTOCOL_VERSION
        header["header_bytes"] = HEADER_DTYPE.itemsize
        header["layout_hash"] = LAYOUT_HASH
        params.write_header(header)
        header["state"] = SidecarState.STARTING
        # NOTE: the magic last: a reader that finds it finds the layout too
        # (before it, readers see a sidecar "starting", not a mismatch).
        header["magic"] = MAGIC
        return cls(names, ctl, data)

    @classmethod
    def attach(cls, names: Names, *, readonly: bool = False, with_data: bool = True) -> Region:
        """Map an existing namespace, checking magic, version and sizes."""
        ctl = Segment.attach(names.ctl, readonly=readonly, keep_fd=not readonly)
        data = None
        try:
            check_prefix(ctl.mm, names.ctl)
            header = header_view(ctl.mm)
            if int(header["header_bytes"]) != HEADER_DTYPE.itemsize:
                raise LayoutMismatch(
                    f"{names.ctl}: header is {int(header['header_bytes'])} bytes, expected {HEADER_DTYPE.itemsize}"
                )
            params = LayoutParams.from_header(header)
            if len(ctl.mm) < params.ctl_bytes:
                raise LayoutMismatch(f"{names.ctl}: {len(ctl.mm)} bytes, the layout needs {params.ctl_bytes}")
            if with_data:
                if int(header["slot_bytes"]) != params.slot_dtype.itemsize:
                    raise LayoutMismatch(
                        f"{names.data}: slot is {int(header['slot_bytes'])} bytes, "
                        f"this code computes {params.slot_dtype.itemsize}"
                    )
                data = Segment.attach(names.data, readonly=readonly)
                if len(data.mm) < params.data_bytes:
                    raise LayoutMismatch(f"{names.data}: {len(data.mm)} bytes, the layout needs {params.data_bytes}")
            del header
            return cls(names, ctl, data)
        except BaseException:
            ctl.close()
            if data is not None:
                data.close()
            raise

    def close(self) -> None:
        # Drop our views first so the mappings can actually be unmapped.
        self.header = self.hv = self.rings = self.slots = None
        self._ctl.close()
        if self._data is not None:
            self._data.close()

    # -- identity ---------------------------------------------------------------------
    def text_field(self, name: str) -> str:
        return bytes(self.header[name]).rstrip(b"\0").decode("utf-8", "replace")

    def models(self) -> list[ModelEntry]:
        """The model table the sidecar wrote (model 0 is the default). A table
        no sidecar would write (a corrupt or hostile header) is LayoutMismatch."""
        n_models = int(self.header["n_models"])
        if not 1 <= n_models <= MAX_MODELS:
            raise LayoutMismatch(f"{self.names.ctl}: {n_models} models in the header, expected 1 to {MAX_MODELS}")
        table = self.header["models"]
        try:
            entries = [ModelEntry.read(i, table[i]) for i in range(n_models)]
        except ValueError as exc:
            raise LayoutMismatch(f"{self.names.ctl}: a model table entry no sidecar writes ({exc})") from None
        params = self.params
        for entry in entries:  # the slots are sized for every model: an entry beyond them was not written by a sidecar
            if (not 1 <= entry.dim <= params.dim or (entry.kind == ModelKind.RERANK and entry.dim != 1)
                    or not 1 <= entry.max_seq_length <= params.max_seq_length
                    or not 1 <= entry.vocab_size <= params.vocab_size
                    or entry.type_vocab_size > MAX_TYPE_VOCAB or not entry.name):
                raise LayoutMismatch(f"{self.names.ctl}: model table entry {entry.index} does not fit the layout")
        check_table_sizes(entries, params, self.names.ctl)
        return entries

    def write_models(self, entries: list[ModelEntry]) -> None:
        """Write the model table (the sidecar, before it is READY)."""
        if not 1 <= len(entries) <= MAX_MODELS:
            raise ValueError(f"{len(entries)} models: one sidecar serves 1 to {MAX_MODELS}")
        table = self.header["models"]
        for entry in entries:
            entry.write(table[entry.index])
        self.header["n_models"] = len(entries)

    @property
    def model_name(self) -> str:
        """The default model's name ("" while the table is unreadable or not written yet)."""
        try:
            return default_model(self.models()).name
        except LayoutMismatch:
            return ""

    @property
    def device(self) -> str:
        return self.text_field("device")

    @property
    def sidecar_pid(self) -> int:
        return int(self.header["sidecar_pid"])

    @property
    def state_name(self) -> str:
        """The sidecar's state, lower case; "unknown" for a value no sidecar writes."""
        return sidecar_state_name(int(self.header["state"]))

    def heartbeat_age_s(self) -> float:
        return (time.monotonic_ns() - int(self.hv.heartbeat_ns[0])) / 1e9

    def loop_overdue_s(self) -> float:
        """How long past its promised deadline the batching loop is (<= 0: on time)."""
        return (time.monotonic_ns() - int(self.hv.loop_deadline_ns[0])) / 1e9

    def loop_age_s(self) -> float:
        return (time.monotonic_ns() - int(self.hv.loop_ns[0])) / 1e9

    # -- liveness -----------------------------------------------------------------------
    def unavailable_reason(self, stale_after_s: float, *, thorough: bool = False) -> str | None:
        """Why this sidecar cannot serve now, or None if it can: the one
        liveness rule that workers, /ready, the stats CLI and the tests share.
        The quick check (state, pid by signal 0, heartbeat, loop deadline)
        costs about a microsecond; ``thorough`` also tells a zombie from a
        live process."""
        hv = self.hv
        state = int(hv.state[0])
        if state != SidecarState.READY:
            name = sidecar_state_name(state)
            return f"sidecar is {name}" if name != "unknown" else f"sidecar state is unknown ({state})"
        return self.liveness_reason(stale_after_s, thorough=thorough)

    def liveness_reason(self, stale_after_s: float, *, thorough: bool = False) -> str | None:
        """The part of the rule that holds whatever the state: why the
        sidecar's process or loop does not run (dead pid, stale heartbeat,
        loop past its deadline), or None."""
        hv = self.hv
        pid = int(hv.sidecar_pid[0])
        if thorough:
            if not pid_alive(pid):
                return f"sidecar pid {pid} is dead"
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"sidecar pid {pid} is dead"
            except PermissionError:
                pass
        age = self.heartbeat_age_s()
        if age > stale_after_s:
            return f"sidecar heartbeat is {age:.1f}s old (hung or stopped)"
        overdue = self.loop_overdue_s()
        if overdue > 0:
            return f"sidecar batching loop made no progress for {self.loop_age_s():.1f}s (wedged)"
        return None

    def successor_pid(self) -> int:
        """The pid of a live successor this sidecar drains for or has handed
        the namespace over to (see the layout's Takeover), or of a dead one
        it still drains for, or 0: a worker that sees one waits for the new
        epoch (or for this sidecar to serve again) instead of failing its request."""
        hv = self.hv
        pid = int(hv.takeover_pid[0])
        state = int(hv.state[0])
        if pid <= 0 or state not in (SidecarState.DRAINING, SidecarState.HANDED_OVER):
            return 0
        if pid_alive(pid):
            return pid
        # A successor that died (or withdrew) while this sidecar drains: it
        # serves again once the drain ends, so a worker waits for that too.
        return pid if state == SidecarState.DRAINING and pid_alive(self.sidecar_pid) else 0

    def check_available(self, stale_after_s: float, *, thorough: bool = False) -> None:
        reason = self.unavailable_reason(stale_after_s, thorough=thorough)
        if reason is not None:
            raise SidecarUnavailable(f"the sidecar cannot serve: {reason}", reason=reason)

    @contextlib.contextmanager
    def lock_rings(self, timeout: float = RING_LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the ring-table lock (RingTableBusy after ``timeout`` seconds).
        The lock is on this mapping's own control segment, so a client of an
        old epoch never locks a newer sidecar's table by name."""
        if self._ctl.fd < 0:
            raise SidecarUnavailable("a read-only attachment cannot lock the ring table", reason="read-only")
        tl = self._thread_lock
        if not (tl.acquire(timeout=timeout) if timeout > 0 else tl.acquire(blocking=False)):
            raise RingTableBusy(f"ring table stayed locked by this process for {timeout:.1f}s")
        try:
            with locked(self._ctl.fd, timeout, "the ring table"):
                yield
        finally:
            self._thread_lock.release()

    def set_text_field(self, name: str, value: str) -> None:
        raw = value.encode("utf-8")
        size = self.header.dtype[name].itemsize
        if len(raw) > size:
            raise LayoutMismatch(f"{name} is {len(raw)} bytes, the header holds {size}")
        self.header[name] = raw

    def occupancy(self) -> np.ndarray:
        """Slot states as an (n_rings, slots_per_ring) array (a copy)."""
        return np.array(self.slots["state"], copy=True)


def check_table_sizes(entries: list[ModelEntry], params: LayoutParams, name: str) -> None:
    """The sidecar sizes the slots for the largest of its models, so the
    table's largest dimension, token limit and vocabulary are the layout's:
    an entry shrunk in place (a dimension of 100 where the model gives 384)
    is LayoutMismatch, not vectors cut short."""
    for field, size in (("dim", params.dim), ("max_seq_length", params.max_seq_length),
                        ("vocab_size", params.vocab_size)):
        largest = max(getattr(entry, field) for entry in entries)
        if largest != size:
            raise LayoutMismatch(f"{name}: the model table's largest {field} is {largest}, the slots are sized "
                                 f"for {size}")


def release_rings_of(names: Names, pid: int, timeout: float = 1.0) -> int:
    """Mark the rings leased by ``pid`` (a dead process) orphaned, so the
    sidecar's reaper resets them at once and a reused pid cannot hold them.
    Maps the control segment only for the call. Returns how many. Bounded:
    it runs in Gunicorn's master, which must never block on a stopped
    lock holder (the reaper finds the dead pid by itself anyway)."""
    try:
        region = Region.attach(names, with_data=False)
    except ShmEmbedError:
        return 0
    try:
        with region.lock_rings(timeout):
            owners = region.rings["owner_pid"]
            mine = owners == pid
            count = int(mine.sum())
            owners[mine] = ORPHANED
            del owners
        return count
    except ShmEmbedError:
        return 0
    finally:
        region.close()


def wait_until_ready(names: Names, pid: int | None = None, timeout: float = 180.0,
                     alive=lambda: True) -> bool:
    """Wait until the namespace's sidecar (``pid``, when given) is READY.
    ``alive()`` returning False (the process exited) stops the wait early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            region = Region.attach(names, readonly=True, with_data=False)
        except ShmEmbedError:
            time.sleep(0.02)
            continue
        ready = int(region.header["state"]) == SidecarState.READY and (pid is None or region.sidecar_pid == pid)
        region.close()
        if ready:
            return True
        time.sleep(0.02)
    return False
