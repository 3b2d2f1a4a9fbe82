"""Prometheus exposition of the whole host, read from the control segment.

Every worker renders the same numbers from shared memory, so no multiprocess
directory is needed and any worker can answer a scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shm_protocol.layout import BATCH_TEXTS_BUCKETS, LATENCY_BUCKETS_S

PREFIX = "shm_embed"


def _buckets(bounds, counts) -> list[tuple[str, float]]:
    out, acc = [], 0
    for b, c in zip(bounds, counts):
        acc += c
        out.append((repr(float(b)), acc))
    acc += counts[len(bounds)]
    out.append(("+Inf", acc))
    return out


class SidecarCollector:
    """Turns one stats snapshot into metric families at scrape time."""

    def __init__(self, snapshot_fn, version: str):
        self._snapshot = snapshot_fn
        self._version = version

    def collect(self):
        up = GaugeMetricFamily(f"{PREFIX}_sidecar_up", "1 when the sidecar is alive and serving.")
        snap = None
        try:
            snap = self._snapshot()
        except Exception:
            snap = None
        serving = snap is not None and snap.unavailable is None
        up.add_metric([], 1.0 if serving else 0.0)
        yield up
        if snap is None:
            return
        info = GaugeMetricFamily(f"{PREFIX}_info", "Model served by the sidecar.",
                                 labels=["model", "device", "dtype", "version", "epoch"])
        info.add_metric([snap.model, snap.device, snap.dtype, self._version, snap.epoch], 1.0)
        yield info
        counters = snap.counters
        for name, key, doc in (
            ("requests", "requests", "Slots (requests or request parts) answered by the sidecar."),
            ("texts", "texts", "Texts embedded."),
            ("tokens", "tokens", "Tokens embedded (after truncation, without padding)."),
            ("padded_tokens", "padded_tokens", "Tokens the model ran, padding included."),
            ("batches", "batches", "Model calls."),
            ("rings_reaped", "rings_reaped", "Rings of dead workers reclaimed."),
            ("loop_errors", "loop_errors", "Exceptions the batching loop caught and survived (see its log)."),
            ("stale_answers", "stale_answers", "Answers dropped because their slot changed generation meanwhile."),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            family.add_metric([], counters[key])
            yield family
        yield from _model_metrics(snap)
        yield from _cache_metrics(snap.cache)
        errs = CounterMetricFamily(f"{PREFIX}_errors", "Slots failed by the sidecar, by kind.", labels=["kind"])
        for kind, count in snap.errors.items():
            errs.add_metric([kind], count)
        yield errs
        for name, value, doc in (
            ("queue_depth", snap.queue_depth, "Slots ready and waiting at the sidecar's last scan."),
            ("busy_slots", snap.busy_slots, "Slots in the batch being computed."),
            ("uptime_seconds", snap.uptime_s, "Seconds since the sidecar started."),
            ("heartbeat_age_seconds", snap.heartbeat_age_s, "Age of the sidecar's heartbeat."),
            ("loop_age_seconds", snap.loop_age_s, "Time since the batching loop last showed progress."),
            ("rings_leased", sum(1 for r in snap.rings if r["owner_pid"] > 0), "Rings leased to workers."),
        ):
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
            gauge.add_metric([], value)
            yield gauge
        yield HistogramMetricFamily(
            f"{PREFIX}_batch_size", "Texts per model call.",
            buckets=_buckets(BATCH_TEXTS_BUCKETS, snap.batch_texts_hist), sum_value=counters["texts"])
        yield HistogramMetricFamily(
            f"{PREFIX}_queue_duration_seconds", "Time a slot waited before its batch started.",
            buckets=_buckets(LATENCY_BUCKETS_S, snap.queue_hist), sum_value=snap.queue_ns_sum / 1e9)
        yield HistogramMetricFamily(
            f"{PREFIX}_compute_duration_seconds", "Time of one model call.",
            buckets=_buckets(LATENCY_BUCKETS_S, snap.compute_hist), sum_value=snap.compute_ns_sum / 1e9)


#: Per-model series: (name, counter key, help, scale).
_MODEL_SERIES = (
    ("model_requests", "requests", "Slots answered, by model.", 1),
    ("model_texts", "texts", "Texts embedded or pairs scored, by model.", 1),
    ("model_tokens", "tokens", "Tokens run (after truncation, without padding), by model.", 1),
    ("model_padded_tokens", "padded_tokens", "Tokens the model ran, padding included, by model.", 1),
    ("model_batches", "batches", "Model calls, by model.", 1),
    ("model_errors", "errors", "Slots of the model failed by the sidecar.", 1),
    ("model_queue_seconds", "queue_ns_sum", "Time its slots waited before their batch started, by model.", 1e-9),
    ("model_compute_seconds", "compute_ns_sum", "Time of its model calls, by model.", 1e-9),
)


def _model_metrics(snap):
    info = GaugeMetricFamily(f"{PREFIX}_model_info", "Models served by the sidecar (1 each).",
                             labels=["model", "kind", "dimension", "max_tokens"])
    for model in snap.models:
        info.add_metric([model["name"], model["kind"], str(model["dimension"]), str(model["max_seq_length"])], 1.0)
    yield info
    for name, key, doc, scale in _MODEL_SERIES:
        fam = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["model"])
        for model in snap.models:
            fam.add_metric([model["name"]], model[key] * scale)
        yield fam


def _cache_metrics(cache: dict):
    """The embedding cache's series (none while it is off)."""
    if not cache.get("enabled"):
        return
    for name, doc in (("hits", "Texts workers answered from the embedding cache."),
                      ("misses", "Texts workers looked up in the embedding cache and sent to the sidecar."),
                      ("inserts", "Vectors the sidecar stored in the embedding cache."),
                      ("evictions", "Entries the embedding cache replaced to make room.")):
        fam = CounterMetricFamily(f"{PREFIX}_cache_{name}", doc)
        fam.add_metric([], cache[name])
        yield fam
    for name, key, doc in (("bytes", "bytes", "Bytes of the embedding cache's entries in use."),
                           ("capacity_bytes", "capacity_bytes", "Bytes of entries the embedding cache holds."),
                           ("capacity_entries", "capacity_entries", "Entries the embedding cache holds.")):
        gauge = GaugeMetricFamily(f"{PREFIX}_cache_{name}", doc)
        gauge.add_metric([], cache[key])
        yield gauge


def make_registry(snapshot_fn, version: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(snapshot_fn, version))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
