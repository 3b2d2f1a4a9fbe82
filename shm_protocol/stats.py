"""A snapshot of the sidecar's counters from the control segment.

The web service (/embedding/stats, /metrics) and the stats CLI read the same
snapshot, so every worker of the host reports the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .cache import read_cache_stats
from .errors import LayoutMismatch
from .layout import (
    BATCH_TEXTS_BUCKETS,
    LATENCY_BUCKETS_S,
    MODEL_STATS_DTYPE,
    SlotError,
    SlotState,
    hist_quantile,
)
from .region import Region
from .segments import pid_alive

#: The sidecar's plain counters, as the stats CLI, /embedding/stats and /metrics show them.
COUNTERS = ("requests", "texts", "tokens", "padded_tokens", "batches", "rings_reaped", "loop_errors",
            "stale_answers")


@dataclass
class Snapshot:
    namespace: str
    model: str
    device: str
    dtype: str  # the default model's weights on the device
    dim: int
    max_seq_length: int
    sidecar_pid: int
    sidecar_alive: bool
    state: str
    epoch: str
    uptime_s: float
    heartbeat_age_s: float
    loop_age_s: float
    unavailable: str | None  # why the sidecar cannot serve (region.unavailable_reason), None when it can
    counters: dict
    errors: dict
    batch_texts_hist: list
    queue_hist: list
    compute_hist: list
    queue_ns_sum: int
    compute_ns_sum: int
    queue_depth: int
    busy_slots: int
    rings: list = field(default_factory=list)
    #: Per served model (default first): name, kind, dimension, max_seq_length and MODEL_STATS_COUNTERS.
    models: list = field(default_factory=list)
    #: The embedding cache's counters (shm_protocol.cache.cache_stats); {"enabled": False} without one.
    cache: dict = field(default_factory=lambda: {"enabled": False})

    def percentiles(self) -> dict:
        """p50/p90/p99 of each histogram (bucket upper bounds; None when empty)."""
        hists = {
            "queue_seconds": (self.queue_hist, LATENCY_BUCKETS_S),
            "compute_seconds": (self.compute_hist, LATENCY_BUCKETS_S),
            "batch_texts": (self.batch_texts_hist, BATCH_TEXTS_BUCKETS),
        }
        return {name: {f"p{int(p * 100)}": hist_quantile(counts, bounds, p) for p in (0.5, 0.9, 0.99)}
                for name, (counts, bounds) in hists.items()}

    def as_dict(self) -> dict:
        fields = dict(self.__dict__)
        fields["percentiles"] = self.percentiles()
        batches = self.counters["batches"]
        fields["mean_batch_texts"] = (self.counters["texts"] / batches) if batches else None
        return fields


#: Each model's counters, as the stats CLI, /embedding/stats and /metrics show them.
MODEL_COUNTERS = MODEL_STATS_DTYPE.names


def _models(region: Region) -> list[dict]:
    """Each model's identity and counters; empty while the table is unreadable."""
    try:
        entries = region.models()
    except LayoutMismatch:
        return []
    table = region.header["models"]
    out = []
    for entry in entries:
        model_stats = np.array(table[entry.index]["stats"], copy=True)
        out.append({"name": entry.name, "kind": entry.kind.name.lower(), "dimension": entry.dim,
                    "max_seq_length": entry.max_seq_length, "dtype": entry.dtype,
                    **{counter: int(model_stats[counter]) for counter in MODEL_COUNTERS}})
    return out


def snapshot(region: Region, stale_after_s: float = 1.0) -> Snapshot:
    """Copy the counters out of a mapped control segment (read-only is enough);
    judge liveness by the same rule as the workers, with ``stale_after_s``."""
    header = region.header
    header_stats = np.array(header["stats"], copy=True)
    rings = []
    occupancy = region.occupancy() if region.slots is not None else None
    for ring_index in range(region.params.n_rings):
        owner = int(region.rings[ring_index]["owner_pid"])
        row = {"ring": ring_index, "owner_pid": owner, "owner_alive": owner > 0 and pid_alive(owner),
               "leases": int(region.rings[ring_index]["leases"])}
        if occupancy is not None:
            states = occupancy[ring_index]
            row["slots"] = {s.name.lower(): int((states == int(s)).sum()) for s in SlotState}
        rings.append(row)
    started = int(header["started_ns"])
    models = _models(region)
    default = next((m for m in models if m["kind"] == "embed"), models[0]) if models else None
    return Snapshot(
        namespace=region.names.namespace,
        model=region.model_name,
        device=region.device,
        dtype=default["dtype"] if default else "",
        dim=default["dimension"] if default else region.params.dim,
        max_seq_length=default["max_seq_length"] if default else region.params.max_seq_length,
        sidecar_pid=region.sidecar_pid,
        sidecar_alive=pid_alive(region.sidecar_pid),
        state=region.state_name,
        epoch=f"{region.epoch:016x}",
        uptime_s=max(0.0, (time.time_ns() - started) / 1e9) if started else 0.0,
        heartbeat_age_s=region.heartbeat_age_s(),
        loop_age_s=region.loop_age_s(),
        unavailable=region.unavailable_reason(stale_after_s, thorough=True),
        counters={k: int(header_stats[k]) for k in COUNTERS},
        errors={e.name.lower(): int(header_stats["errors"][int(e)]) for e in SlotError if e != SlotError.NONE},
        batch_texts_hist=[int(x) for x in header_stats["batch_texts_hist"]],
        queue_hist=[int(x) for x in header_stats["queue_hist"]],
        compute_hist=[int(x) for x in header_stats["compute_hist"]],
        queue_ns_sum=int(header_stats["queue_ns_sum"]),
        compute_ns_sum=int(header_stats["compute_ns_sum"]),
        queue_depth=int(header_stats["ready_slots"]),
        busy_slots=int(header_stats["busy_slots"]),
        rings=rings,
        models=models,
        cache=read_cache_stats(region.names),
    )
