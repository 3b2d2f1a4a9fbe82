"""HTTP load: shm-embed against two other ways to serve the same model from
Gunicorn, in one run on this machine.

  shm-embed      4 Gunicorn workers + the sidecar (this project)
  per-worker     4 Gunicorn workers, each loading the model (USE_IPC_EMBEDDING=false)
  dirty-workers  4 Gunicorn workers + gunicorn's dirty worker pool holding the model

For each: short queries (4-12 words) and passages (8-60 words), 1 and 16
concurrent clients, 1 and 32 texts per request; requests/s, texts/s, p50 and
p99; total resident memory of the setup. Also the in-process ceiling
(SentenceTransformer.encode of the same texts at its best batch size).
The load generator is bounded in time and only talks to 127.0.0.1.

    python bench/http_load.py [--seconds 6] [--setups shm-embed,per-worker,dirty-workers] [--rounds 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

from _common import REPO, children_by_parent, passages, pct, running_sidecar, short_queries, stop_process, table

WORKERS = 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory_mb(root_pids: list[int]) -> tuple[float, float]:
    """Total (RSS, PSS) of processes and all their descendants. PSS counts a
    shared page once across the processes that share it, so its sum is the
    setup's real footprint; the RSS sum counts shared libraries N times."""
    children = children_by_parent()
    rss = pss = 0.0
    todo, seen = list(root_pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            pass
    return rss, pss


def start_gunicorn(conf: str, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(env, SHM_EMBED_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY=str(WORKERS), SHM_EMBED_LOG_LEVEL="WARNING",
               SHM_EMBED_MAX_INPUTS="4096")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", conf], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    body = json.dumps({"inputs": ["warm up"]}).encode()
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://{base}/embed", data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                if r.status == 200:
                    # every worker warm: a few more
                    for _ in range(3 * WORKERS):
                        urllib.request.urlopen(urllib.request.Request(
                            f"http://{base}/embed", data=body, headers={"content-type": "application/json"}),
                            timeout=60).read()
                    return proc, base
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"{conf} exited with {proc.returncode}")
    proc.kill()
    raise TimeoutError(conf)


def load(base: str, texts: list[str], clients: int, per_request: int, seconds: float) -> dict:
    host, port = base.split(":")
    lat: list[float] = []
    counts = {"ok": 0, "err": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(seed: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        i = seed * 997
        mine, ok, err = [], 0, 0
        while time.monotonic() < stop_at:
            batch = [texts[(i + k) % len(texts)] for k in range(per_request)]
            i += per_request
            body = json.dumps({"inputs": batch, "normalize": True})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/embed", body, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                good = r.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                good = False
            mine.append(time.perf_counter() - t0)
            ok += good
            err += not good
        conn.close()
        with lock:
            lat.extend(mine)
            counts["ok"] += ok
            counts["err"] += err

    threads = [threading.Thread(target=run, args=(s,)) for s in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {"rps": counts["ok"] / elapsed, "tps": counts["ok"] * per_request / elapsed,
            "p50": pct(lat, 50) * 1e3, "p99": pct(lat, 99) * 1e3, "errors": counts["err"]}


def ceiling(texts_by_set: dict, seconds: float) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from shm_protocol.model_files import bundled_model_path

    torch.set_num_threads(os.cpu_count())
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    out = {}
    for name, texts in texts_by_set.items():
        best = (0.0, 0)
        for bs in (1, 16, 32, 64):
            model.encode(texts[:bs], batch_size=bs)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 2:
                model.encode(texts[n % 1000: n % 1000 + bs], batch_size=bs)
                n += bs
            rate = n / (time.perf_counter() - t0)
            if bs == 1:
                t1 = time.perf_counter()
                for t in texts[:30]:
                    model.encode([t])
                out[name + "_single_ms"] = (time.perf_counter() - t1) / 30 * 1e3
            best = max(best, (rate, bs))
        out[name] = best
    return out


def run_setup(setup: str, sets: dict, cells: list, seconds: float, env: dict) -> tuple[dict, tuple[float, float]]:
    """Start one setup, run every cell against it, measure its memory, stop it."""
    print(f"... {setup}", file=sys.stderr, flush=True)
    sidecar_ctx = running_sidecar() if setup == "shm-embed" else None
    extra_pids = []
    if sidecar_ctx is not None:
        settings, sproc = sidecar_ctx.__enter__()
        extra_pids = [sproc.pid]
        proc, base = start_gunicorn(str(REPO / "gunicorn.conf.py"), dict(env, SHM_EMBED_NAMESPACE=settings.namespace))
    elif setup == "per-worker":
        proc, base = start_gunicorn(str(REPO / "gunicorn.conf.py"), dict(env, USE_IPC_EMBEDDING="false"))
    else:
        proc, base = start_gunicorn(str(REPO / "bench" / "gunicorn_dirty.conf.py"), env)
    try:
        results = {(set_name, clients, per): load(base, texts, clients, per, seconds)
                   for set_name, texts in sets.items() for clients, per in cells}
        time.sleep(1.0)  # measured at rest after the load, the same for every setup
        return results, tree_memory_mb([proc.pid] + extra_pids)
    finally:
        stop_process(proc, timeout=60)
        if sidecar_ctx is not None:
            sidecar_ctx.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--setups", default="shm-embed,per-worker,dirty-workers")
    ap.add_argument("--cells", default="1x1,16x1,1x32,16x32", help="clients x texts per request")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every setup this many times, alternating, and report each round's ratios")
    args = ap.parse_args()
    sets = {"queries": short_queries(2000, seed=11), "passages": passages(2000, seed=12)}
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    setups = args.setups.split(",")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results: dict[tuple, dict] = {}
    memory: dict[tuple, tuple[float, float]] = {}
    ceilings: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        ceilings.append(ceiling(sets, args.seconds))
        for setup in setups:
            res, memory[(rnd, setup)] = run_setup(setup, sets, cells, args.seconds, env)
            results.update({(rnd, setup) + key: r for key, r in res.items()})
    rows = []
    for (rnd, setup, set_name, clients, per), r in results.items():
        rows.append([rnd, setup, set_name, clients, per, f"{r['rps']:.1f}", f"{r['tps']:.1f}", f"{r['p50']:.1f}",
                     f"{r['p99']:.1f}", r["errors"]])
    print(f"\nHTTP load, {WORKERS} Gunicorn workers per setup, {args.seconds:.0f}s per cell, {os.cpu_count()} cores")
    print(table(rows, ["round", "setup", "texts", "clients", "texts/req", "req/s", "texts/s", "p50 ms", "p99 ms",
                       "errors"]))
    print("\nin-process ceiling (SentenceTransformer.encode, best batch size), measured before each round:")
    for rnd, ceil in enumerate(ceilings, 1):
        for name in sets:
            rate, bs = ceil[name]
            print(f"  round {rnd} {name}: {rate:.1f} texts/s at batch {bs}; one text alone "
                  f"{ceil[name + '_single_ms']:.1f} ms")
    print(f"\ntotal memory with {WORKERS} workers (every process of the setup, 1 s after the load):")
    for (rnd, setup), (rss, pss) in memory.items():
        print(f"  round {rnd} {setup}: PSS {pss:.0f} MiB (RSS summed {rss:.0f} MiB)")
    if "shm-embed" in setups and (16, 1) in cells:
        print("\nshm-embed, 16 single-text clients, per round:")
        for rnd, ceil in enumerate(ceilings, 1):
            parts = []
            for set_name in sets:
                ours = results[(rnd, "shm-embed", set_name, 16, 1)]["tps"]
                vs = [f"{ours / results[(rnd, other, set_name, 16, 1)]['tps']:.2f}x {other}"
                      for other in setups if other != "shm-embed"]
                parts.append(f"{set_name} {ours:.1f} texts/s = {ours / ceil[set_name][0]:.2f} of ceiling"
                             + (", " + ", ".join(vs) if vs else ""))
            print(f"  round {rnd}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
