"""Where the CPU goes under HTTP load: the sidecar, each Gunicorn worker and
the load generator, in CPU milliseconds per request, with the sidecar's own
batch figures (mean batch, compute per batch, time busy, queue wait).

    python bench/cpu_split.py [--seconds 8] [--clients 16] [--rounds 2]

Short queries, one text per request, 4 workers. On 2 cores every millisecond
a worker spends is taken from the model, so this is the figure to watch when
changing anything on the worker's path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import urllib.request

from _common import REPO, child_pids, proc_stat, running_sidecar, short_queries, stop_process, table
from http_load import load, start_gunicorn


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stats(base: str) -> dict:
    with urllib.request.urlopen(f"http://{base}/embedding/stats", timeout=10) as r:
        return json.load(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    texts = short_queries(2000, seed=11)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with running_sidecar() as (settings, sidecar):
        proc, base = start_gunicorn(str(REPO / "gunicorn.conf.py"), dict(env, SHM_EMBED_NAMESPACE=settings.namespace))
        try:
            workers = child_pids(proc.pid)
            for rnd in range(1, args.rounds + 1):
                pids = {"sidecar": sidecar.pid, **{f"worker {i + 1}": w for i, w in enumerate(workers)}}
                c0 = {k: cpu_seconds(p) for k, p in pids.items()}
                own0, s0, t0 = own_cpu_seconds(), stats(base), time.monotonic()
                measured = load(base, texts, args.clients, 1, args.seconds)
                elapsed, own1, s1 = time.monotonic() - t0, own_cpu_seconds(), stats(base)
                c1 = {k: cpu_seconds(p) for k, p in pids.items()}
                requests = max(1.0, measured["tps"] * elapsed)
                used = {k: c1[k] - c0[k] for k in pids}
                workers_cpu = sum(v for k, v in used.items() if k.startswith("worker"))
                batches = max(1, s1["counters"]["batches"] - s0["counters"]["batches"])
                texts_done = s1["counters"]["texts"] - s0["counters"]["texts"]
                compute_s = (s1["compute_ns_sum"] - s0["compute_ns_sum"]) / 1e9
                queue_s = (s1["queue_ns_sum"] - s0["queue_ns_sum"]) / 1e9
                rows.append([
                    rnd, f"{measured['tps']:.1f}", f"{measured['p99']:.0f}",
                    f"{used['sidecar'] / requests * 1e3:.2f}", f"{workers_cpu / requests * 1e3:.2f}",
                    f"{(own1 - own0) / requests * 1e3:.2f}",
                    f"{used['sidecar'] / elapsed:.2f}", f"{workers_cpu / elapsed:.2f}",
                    f"{texts_done / batches:.1f}", f"{compute_s / batches * 1e3:.1f}",
                    f"{compute_s / elapsed:.2f}", f"{queue_s / max(1, texts_done) * 1e3:.1f}",
                ])
        finally:
            stop_process(proc, timeout=60)
    print(f"\n{args.clients} clients x 1 short query, 4 workers, {args.seconds:.0f}s per round, {os.cpu_count()} cores")
    print(table(rows, ["round", "texts/s", "p99 ms", "sidecar cpu ms/req", "workers cpu ms/req",
                       "load gen cpu ms/req", "sidecar cores", "workers cores", "mean batch",
                       "compute ms/batch", "busy", "queue ms/text"]))


if __name__ == "__main__":
    main()
