"""The embedding cache on a Zipf query stream: texts/s and hit rate with and
without the cache, side by side in one run, and a hit's latency measured in
the client.

N client processes each send one query at a time, drawn from a Zipf
distribution (exponent s) over a fixed set of distinct queries, first to a
sidecar without the cache (SHM_EMBED_CACHE_MB=0), then to one with it (the
cache starts empty, as after every sidecar start). A request whose text was
a hit never reaches the sidecar (its EmbedResult used no slot).

    python bench/cache.py [--clients 16] [--seconds 15] [--queries 100000] [--zipf 1.1]
                          [--cache-mb 64] [--synthetic-us N] [--model PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np
from _common import pct, running_sidecar, short_queries, table


def zipf_stream(n_queries: int, exponent: float, length: int, seed: int) -> np.ndarray:
    """Indices into the queries: rank k (0-based) drawn with probability ∝ (k + 1) ** -exponent."""
    weights = np.arange(1, n_queries + 1, dtype=np.float64) ** -exponent
    return np.random.default_rng(seed).choice(n_queries, size=length, p=weights / weights.sum())


def distinct_queries(n: int) -> list[str]:
    """``n`` distinct search-like queries (a number keeps each one apart)."""
    return [f"{q} {i}" for i, q in enumerate(short_queries(n, seed=5))]


def requester(settings, n_queries: int, exponent: float, seed: int, start_at: float, seconds: float, q) -> None:
    from shm_protocol import EmbeddingClient

    queries = distinct_queries(n_queries)
    stream = zipf_stream(n_queries, exponent, 200_000, seed)
    client = EmbeddingClient.connect(settings)
    client.embed(["warm up the tokenizer"])
    while time.time() < start_at:
        time.sleep(0.001)
    done, hits, hit_lat, miss_lat = 0, 0, [], []
    stop = start_at + seconds
    while time.time() < stop:
        text = queries[int(stream[done % len(stream)])]
        t0 = time.perf_counter_ns()
        res = client.embed_detailed([text])
        elapsed = time.perf_counter_ns() - t0
        done += 1
        if res.slots_used == 0:
            hits += 1
            hit_lat.append(elapsed)
        else:
            miss_lat.append(elapsed)
    client.close()
    q.put((done, hits, hit_lat, miss_lat))


def run_phase(settings, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 5 + 0.5 * args.clients  # every process imports and attaches first
    procs = [ctx.Process(target=requester, args=(settings, args.queries, args.zipf, seed, start_at, args.seconds, q))
             for seed in range(args.clients)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    done = sum(r[0] for r in results)
    hits = sum(r[1] for r in results)
    hit_lat = [x for r in results for x in r[2]]
    miss_lat = [x for r in results for x in r[3]]
    return {"rate": done / args.seconds, "hit_rate": hits / done if done else 0.0,
            "hit_p50_us": pct(hit_lat, 50) / 1e3 if hit_lat else None,
            "hit_p99_us": pct(hit_lat, 99) / 1e3 if hit_lat else None,
            "miss_p50_us": pct(miss_lat, 50) / 1e3 if miss_lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--queries", type=int, default=100_000, help="distinct queries the stream draws from")
    ap.add_argument("--zipf", type=float, default=1.1, help="the Zipf exponent s")
    ap.add_argument("--cache-mb", type=int, default=64)
    ap.add_argument("--synthetic-us", type=int, default=None,
                    help="serve the synthetic backend (each call takes N us) instead of the model")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    base = {"SHM_EMBED_RINGS": args.clients + 2}
    if args.synthetic_us is not None:
        base["SHM_EMBED_SYNTHETIC_US"] = args.synthetic_us
    phases = {}
    for label, cache_mb in (("without the cache", 0), (f"with the cache ({args.cache_mb} MiB)", args.cache_mb)):
        with running_sidecar(args.model, SHM_EMBED_CACHE_MB=cache_mb, **base) as (settings, _):
            phases[label] = run_phase(settings, args)

    def us(value) -> str:
        return "-" if value is None else f"{value:.1f}"

    off = phases["without the cache"]["rate"]
    rows = [[label, f"{r['rate']:.0f}", f"{r['rate'] / off:.2f}" if off else "-", f"{r['hit_rate']:.1%}",
             us(r["hit_p50_us"]), us(r["hit_p99_us"]), us(r["miss_p50_us"])] for label, r in phases.items()]
    backend = f"synthetic {args.synthetic_us} us" if args.synthetic_us is not None else (args.model or "bundled model")
    print(f"\nZipf s={args.zipf} over {args.queries:,} queries, {args.clients} clients, one text per request, "
          f"{args.seconds:g} s per phase, {backend}")
    print(table(rows, ["setup", "texts/s", "x", "hit rate", "hit p50 us", "hit p99 us", "miss p50 us"]))


if __name__ == "__main__":
    main()
