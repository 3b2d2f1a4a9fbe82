"""Throughput with N concurrent single-text requesters (processes).

Side by side in one run, on the same texts:
  1. in-process ceiling: SentenceTransformer.encode at batch size 32, one process;
  2. shm-embed: N processes, each sending one text at a time through the sidecar;
  3. N processes each loading the model and encoding alone (1 torch thread each).

    python bench/throughput.py [--procs 8] [--seconds 15] [--texts queries|passages]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from _common import passages, running_sidecar, short_queries, table


def _texts(kind: str, n: int, seed: int) -> list[str]:
    return short_queries(n, seed) if kind == "queries" else passages(n, seed)


def _closed_loop(embed, kind, seed, start_at, seconds, results) -> None:
    """One requester: one text at a time, from start_at for seconds."""
    texts = _texts(kind, 2000, seed)
    embed(texts[:2])
    while time.time() < start_at:
        time.sleep(0.001)
    count, stop, lat = 0, start_at + seconds, []
    while time.time() < stop:
        t0 = time.perf_counter()
        embed([texts[count % len(texts)]])
        lat.append(time.perf_counter() - t0)
        count += 1
    results.put((count, lat))


def shm_requester(settings, kind, seed, start_at, seconds, q):
    from shm_protocol import EmbeddingClient

    client = EmbeddingClient.connect(settings)
    _closed_loop(client.embed, kind, seed, start_at, seconds, q)
    client.close()


def local_requester(model_path, kind, seed, start_at, seconds, results):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    model = SentenceTransformer(model_path, device="cpu")
    _closed_loop(model.encode, kind, seed, start_at, seconds, results)


def run_procs(target, first_arg, kind, procs, seconds) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 25 + 2 * procs  # time for every process to import and load
    ps = [ctx.Process(target=target, args=(first_arg, kind, i, start_at, seconds, queue)) for i in range(procs)]
    for p in ps:
        p.start()
    results = [queue.get(timeout=600) for _ in ps]
    for p in ps:
        p.join(60)
    total = sum(n for n, _ in results)
    lat = [x for _, ls in results for x in ls]
    return total / seconds, lat


def ceiling(model_path: str, kind: str, seconds: float, batch: int = 32) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count())
    model = SentenceTransformer(model_path, device="cpu")
    texts = _texts(kind, 4000, 99)
    model.encode(texts[:64], batch_size=batch)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = texts[(count % 3000): (count % 3000) + 10 * batch]
        model.encode(chunk, batch_size=batch)
        count += len(chunk)
    rate = count / (time.perf_counter() - t0)
    del model
    return rate


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--texts", choices=("queries", "passages"), default="queries")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-wait-us", type=int, default=None, help="override SHM_EMBED_MAX_WAIT_US")
    args = ap.parse_args()
    from shm_protocol.model_files import bundled_model_path

    model_path = args.model or str(bundled_model_path())
    ceil = ceiling(model_path, args.texts, args.seconds)
    # N single-text requesters can never form a batch larger than N.
    ceil_n = ceiling(model_path, args.texts, args.seconds / 2, batch=args.procs)
    extra = {} if args.max_wait_us is None else {"SHM_EMBED_MAX_WAIT_US": args.max_wait_us}
    with running_sidecar(args.model, **extra) as (settings, _):
        shm_rate, shm_lat = run_procs(shm_requester, settings, args.texts, args.procs, args.seconds)
    local_rate, local_lat = run_procs(local_requester, model_path, args.texts, args.procs, args.seconds)

    def ms(lat, q):
        return f"{np.percentile(lat, q) * 1e3:.1f}"

    rows = [
        ["in-process ceiling (encode, batch 32)", f"{ceil:.1f}", "1.00", "-", "-"],
        [f"in-process, batch {args.procs} (the largest batch {args.procs} requesters make)", f"{ceil_n:.1f}",
         f"{ceil_n / ceil:.2f}", "-", "-"],
        [f"shm-embed, {args.procs} requester processes", f"{shm_rate:.1f}", f"{shm_rate / ceil:.2f}",
         ms(shm_lat, 50), ms(shm_lat, 99)],
        [f"{args.procs} processes, own model each", f"{local_rate:.1f}", f"{local_rate / ceil:.2f}",
         ms(local_lat, 50), ms(local_lat, 99)],
    ]
    print(f"\nthroughput, {args.texts}, one text per request, {args.seconds:.0f}s per phase, {os.cpu_count()} cores")
    print(table(rows, ["setup", "texts/s", "of ceiling", "p50 ms", "p99 ms"]))
    print(f"shm-embed / per-process: {shm_rate / local_rate:.2f}x")


if __name__ == "__main__":
    main()
