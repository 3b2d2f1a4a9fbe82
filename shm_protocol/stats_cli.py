"""``shm-embed-stats``: look inside a running deployment from a terminal.

Attaches read-only to the namespace's segments (no HTTP, no ring lease, no
effect on the sidecar) and prints the sidecar's state, the rings and the
counters. Exit status: 0 serving, 1 stopped, hung or dead, 2 no sidecar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .config import Settings
from .errors import LayoutMismatch, SidecarUnavailable
from .region import Region
from .segments import Names
from .stats import COUNTERS, Snapshot, snapshot

EXIT_OK, EXIT_UNHEALTHY, EXIT_ABSENT = 0, 1, 2


def health(snap: Snapshot) -> tuple[int, str]:
    """Exit status and status line, by the workers' own liveness rule."""
    if snap.unavailable is not None:
        return EXIT_UNHEALTHY, snap.unavailable
    return EXIT_OK, "serving"


def rates(now: Snapshot, before: Snapshot | None, dt: float) -> dict:
    if before is None or dt <= 0 or before.epoch != now.epoch:
        return {}
    return {k: (now.counters[k] - before.counters[k]) / dt for k in ("requests", "texts", "tokens", "batches")}


def _fmt_s(v) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.2f} s"


def render(snap: Snapshot, status: str, rate: dict):
    """A rich renderable of one snapshot."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    head = Table(title=f"shm-embed namespace {snap.namespace}", show_header=False, box=None)
    head.add_row("status", status)
    head.add_row("sidecar", f"pid {snap.sidecar_pid} ({'alive' if snap.sidecar_alive else 'dead'}), "
                            f"state {snap.state}, epoch {snap.epoch}")
    head.add_row("uptime", f"{snap.uptime_s:.0f} s; heartbeat {snap.heartbeat_age_s * 1e3:.0f} ms ago, "
                           f"loop progress {snap.loop_age_s * 1e3:.0f} ms ago")
    head.add_row("model", f"{escape(snap.model)} ({snap.dim} dims, max {snap.max_seq_length} tokens) "
                          f"on {snap.device} in {escape(snap.dtype)}")
    head.add_row("queue", f"{snap.queue_depth} slots ready, {snap.busy_slots} in the model")
    cache = snap.cache
    if cache.get("enabled"):
        rate = f"{cache['hit_rate']:.1%}" if cache["hit_rate"] is not None else "-"
        head.add_row("cache", f"{cache['hits']:,} hits, {cache['misses']:,} misses ({rate}); {cache['inserts']:,} "
                              f"inserts, {cache['evictions']:,} evictions; {cache['bytes'] / 2**20:.1f} of "
                              f"{cache['capacity_bytes'] / 2**20:.1f} MiB in use")
    else:
        head.add_row("cache", "off")

    rings = Table(title="rings", show_lines=False)
    for col in ("ring", "owner pid", "owner", "free", "claimed", "ready", "busy", "done", "error"):
        rings.add_column(col, justify="right")
    for ring in snap.rings:
        if ring["owner_pid"] == 0 and not any(v for k, v in ring.get("slots", {}).items() if k != "free"):
            continue
        slots = ring.get("slots", {})
        owner = "orphaned" if ring["owner_pid"] < 0 else ("alive" if ring["owner_alive"] else "dead")
        rings.add_row(str(ring["ring"]), str(ring["owner_pid"]), owner,
                      *(str(slots.get(k, "-")) for k in ("free", "claimed", "ready", "busy", "done", "error")))

    counters = Table(title="totals")
    counters.add_column("counter")
    counters.add_column("total", justify="right")
    counters.add_column("per second", justify="right")
    for counter in COUNTERS:
        counters.add_row(counter, f"{snap.counters[counter]:,}", f"{rate[counter]:.1f}" if counter in rate else "-")
    for kind, count in snap.errors.items():
        counters.add_row(f"errors: {kind}", f"{count:,}", "-")

    per_model = Table(title="models")
    for col in ("model", "kind", "requests", "texts", "tokens", "batches", "errors", "mean call"):
        per_model.add_column(col, justify="right")
    for model in snap.models:
        mean = model["compute_ns_sum"] / model["batches"] / 1e9 if model["batches"] else None
        counts = (f"{model[k]:,}" for k in ("requests", "texts", "tokens", "batches", "errors"))
        per_model.add_row(escape(model["name"]), model["kind"], *counts, _fmt_s(mean))

    pct = snap.percentiles()
    lat = Table(title="latency and batches (histogram bucket bounds)")
    for col in ("", "p50", "p90", "p99"):
        lat.add_column(col, justify="right")
    lat.add_row("queue wait", *(_fmt_s(pct["queue_seconds"][p]) for p in ("p50", "p90", "p99")))
    lat.add_row("model call", *(_fmt_s(pct["compute_seconds"][p]) for p in ("p50", "p90", "p99")))
    lat.add_row("texts per call", *(str(pct["batch_texts"][p]) if pct["batch_texts"][p] else "-"
                                    for p in ("p50", "p90", "p99")))
    return Group(head, rings, counters, per_model, lat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shm-embed-stats", description=__doc__.splitlines()[0])
    ap.add_argument("--namespace", help="deployment to inspect (default SHM_EMBED_NAMESPACE or shm-embed)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                    help="refresh in place every SECONDS (default 2), with rates between refreshes")
    args = ap.parse_args(argv)
    overrides = {"namespace": args.namespace} if args.namespace else {}
    settings = Settings.from_env(os.environ, **overrides)
    names = Names(settings.namespace)
    try:
        region = Region.attach(names, readonly=True)
    except SidecarUnavailable:
        msg = f"no sidecar: namespace {settings.namespace!r} has no segments (is shm-embed-sidecar running?)"
        if args.json:
            print(json.dumps({"namespace": settings.namespace, "status": "absent", "message": msg}))
        else:
            print(msg, file=sys.stderr)
        return EXIT_ABSENT
    except LayoutMismatch as exc:
        print(f"cannot read namespace {settings.namespace!r}: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    try:
        if args.watch:
            return _watch(region, settings, args.watch)
        snap = snapshot(region, settings.stale_after_s)
        code, status = health(snap)
        if args.json:
            doc = snap.as_dict()
            doc["status"] = status
            doc["healthy"] = code == EXIT_OK
            print(json.dumps(doc, indent=2))
        else:
            from rich.console import Console

            Console().print(render(snap, status, {}))
            if code != EXIT_OK:
                print(status, file=sys.stderr)
        return code
    finally:
        region.close()


def _watch(region: Region, settings: Settings, every: float) -> int:
    from rich.console import Console
    from rich.live import Live

    before, t_before = None, 0.0
    code = EXIT_OK
    try:
        with Live(console=Console(), auto_refresh=False, screen=False) as live:
            while True:
                snap = snapshot(region, settings.stale_after_s)
                now = time.monotonic()
                code, status = health(snap)
                live.update(render(snap, status, rates(snap, before, now - t_before)), refresh=True)
                before, t_before = snap, now
                time.sleep(every)
    except KeyboardInterrupt:
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
