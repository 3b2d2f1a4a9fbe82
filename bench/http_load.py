"""HTTP load: shm-embed against other ways to serve the same model behind
Gunicorn, in one run on this machine, on the same texts, clients and dtype.

  shm-embed      4 Gunicorn workers + the sidecar (this project)
  per-worker     4 Gunicorn workers, each loading the model (the project's local fallback)
  dirty-workers  4 Gunicorn workers + gunicorn's dirty worker pool holding the model
  infinity       4 Gunicorn workers POSTing to an infinity-emb server (torch engine)
  vllm           4 Gunicorn workers POSTing to vLLM's embedding server (CUDA hosts only)

Every setup serves the same Falcon app (shm-embed's /embed); only what
computes the vectors differs. The model is the bundled all-MiniLM-L6-v2 on
--device at --dtype in every setup. For each: short queries (4-12 words) and
passages (8-60 words), at each cell of clients x texts per request; texts/s,
p50 and p99, and texts/s as a ratio of shm-embed's in the same round; total
resident memory of the setup. Also the in-process ceiling
(SentenceTransformer.encode of the same texts at its best batch size).
A setup that cannot run here (vLLM without CUDA or without vllm) prints
"not run" with the reason. The load generator is bounded in time and only
talks to 127.0.0.1. docs/peers.md says how to run it.

    python bench/http_load.py [--seconds 6] [--setups shm-embed,infinity] [--dtype float32] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

from _common import REPO, children_by_parent, passages, pct, running_sidecar, short_queries, stop_process, table
from _peers import SERVED_NAME, PeerUnavailable, infinity_python, infinity_server, vllm_python, vllm_server

WORKERS = 4
SETUPS = ("shm-embed", "per-worker", "dirty-workers", "infinity", "vllm")


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


def start_gunicorn(conf: str, env: dict, app: str | None = None) -> tuple[subprocess.Popen, str]:
    """Gunicorn with ``conf`` (and ``app`` instead of its wsgi_app, if given), warmed up."""
    port = free_port()
    env = dict(env, SHM_EMBED_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY=str(WORKERS), SHM_EMBED_LOG_LEVEL="WARNING",
               SHM_EMBED_MAX_INPUTS="4096")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", conf, *([app] if app else [])], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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



def ceiling(texts_by_set: dict, seconds: float, device: str, dtype: str) -> dict:
    import torch
    from peer_apps import place_model
    from sentence_transformers import SentenceTransformer

    from shm_protocol.model_files import bundled_model_path

    torch.set_num_threads(os.cpu_count())
    model = place_model(SentenceTransformer(str(bundled_model_path()), device="cpu"), device, dtype)
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
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the GPU's memory back to the setups
    return out


class Peers:
    """The Python of each peer server, found (or, for infinity, built) once per run."""

    def __init__(self, args):
        self.args = args
        self._found: dict[str, str | PeerUnavailable] = {}

    def python(self, setup: str) -> str:
        if setup not in self._found:
            try:
                self._found[setup] = (infinity_python(self.args.infinity_python) if setup == "infinity"
                                      else vllm_python(self.args.vllm_python, self.args.device))
            except PeerUnavailable as exc:
                self._found[setup] = exc
        found = self._found[setup]
        if isinstance(found, PeerUnavailable):
            raise found
        return found


def run_setup(setup: str, sets: dict, cells: list, args, env: dict, peers: Peers):
    """Start one setup, run every cell against it, measure its memory, stop it.
    Raises PeerUnavailable when the setup cannot run here."""
    from shm_protocol.model_files import bundled_model_path

    print(f"... {setup}", file=sys.stderr, flush=True)
    conf = str(REPO / "gunicorn.conf.py")
    with contextlib.ExitStack() as stack:
        extra_pids = []
        if setup == "shm-embed":
            settings, sidecar = stack.enter_context(running_sidecar())
            extra_pids = [sidecar.pid]
            proc, base = start_gunicorn(conf, dict(env, SHM_EMBED_NAMESPACE=settings.namespace))
        elif setup == "per-worker":
            proc, base = start_gunicorn(conf, dict(env, USE_IPC_EMBEDDING="false"),
                                        "bench.peer_apps:local_application()")
        elif setup == "dirty-workers":
            proc, base = start_gunicorn(str(REPO / "bench" / "gunicorn_dirty.conf.py"), env)
        else:
            python = peers.python(setup)
            server = (infinity_server(python, bundled_model_path(), args.device, args.dtype, env) if setup == "infinity"
                      else vllm_server(python, bundled_model_path(), args.dtype, env))
            peer, url = stack.enter_context(server)
            extra_pids = [peer.pid]
            proc, base = start_gunicorn(conf, dict(env, BENCH_PEER_URL=url, BENCH_PEER_MODEL=SERVED_NAME),
                                        "bench.peer_apps:remote_application()")
        stack.callback(stop_process, proc, timeout=60)
        results = {(set_name, clients, per): load(base, texts, clients, per, args.seconds)
                   for set_name, texts in sets.items() for clients, per in cells}
        time.sleep(1.0)  # measured at rest after the load, the same for every setup
        return results, tree_memory_mb([proc.pid] + extra_pids)


def report(results: dict, not_run: dict, setups: list, sets: dict, cells: list, rounds: int) -> str:
    """One table: a row per round, text set and setup; per cell texts/s (with its ratio
    to shm-embed's in the same round) and p50/p99 in ms; then the setups that did not run."""
    header = ["round", "texts", "setup"]
    for clients, per in cells:
        header += [f"{clients}x{per} texts/s", f"{clients}x{per} p50/p99 ms"]
    rows = []
    for rnd in range(1, rounds + 1):
        for set_name in sets:
            for setup in setups:
                if (rnd, setup) in not_run:
                    continue
                row = [rnd, set_name, setup]
                for clients, per in cells:
                    r = results[(rnd, setup, set_name, clients, per)]
                    ours = results.get((rnd, "shm-embed", set_name, clients, per))
                    cell = f"{r['tps']:.1f}"
                    if ours is not None and setup != "shm-embed":
                        cell += f" ({r['tps'] / ours['tps']:.2f}x)" if ours["tps"] else " (-)"
                    if r["errors"]:
                        cell += f" {r['errors']} err"
                    row += [cell, f"{r['p50']:.1f}/{r['p99']:.1f}"]
                rows.append(row)
    lines = [table(rows, header)] if rows else []
    width = max(len(s) for s in setups)
    for (rnd, setup), reason in not_run.items():
        lines.append(f"round {rnd}  {setup.ljust(width)}  not run: {reason}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6, help="load per cell, in seconds")
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("--cells", default="1x1,16x1,1x32,16x32", help="clients x texts per request")
    ap.add_argument("--texts", default="queries,passages", help="text sets: queries, passages or both")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every setup this many times, alternating, and report each round's ratios")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where every setup runs the model (auto: CUDA when torch sees a GPU)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="the model's weights in every setup (float16: CUDA only)")
    ap.add_argument("--infinity-python", metavar="PATH",
                    help="a Python with infinity_emb; default: an environment built once from "
                         "bench/requirements-infinity.txt under ~/.cache/shm-embed-bench")
    ap.add_argument("--vllm-python", metavar="PATH", help="a Python with vllm (default: this one, if it has vllm)")
    args = ap.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown or not setups:
        ap.error(f"--setups: unknown {', '.join(unknown) or '(none given)'}; accepted: {', '.join(SETUPS)}")
    try:
        cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    except ValueError:
        ap.error(f"--cells {args.cells!r}: expected CLIENTSxTEXTS[,...], e.g. 1x1,16x32")
    all_sets = {"queries": short_queries(2000, seed=11), "passages": passages(2000, seed=12)}
    wanted_sets = args.texts.split(",")
    if not wanted_sets or set(wanted_sets) - set(all_sets):
        ap.error(f"--texts {args.texts!r}: accepted: queries, passages")
    sets = {name: all_sets[name] for name in wanted_sets}
    from peer_apps import resolve_device

    args.device = resolve_device(args.device)
    if args.dtype == "float16" and args.device != "cuda":
        ap.error("--dtype float16 needs a CUDA device (--device cuda); on a CPU use float32 or bfloat16")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               SHM_EMBED_DEVICE=args.device, SHM_EMBED_DTYPE=args.dtype)
    os.environ.update(SHM_EMBED_DEVICE=args.device, SHM_EMBED_DTYPE=args.dtype)  # the sidecar's too
    peers = Peers(args)
    results: dict[tuple, dict] = {}
    memory: dict[tuple, tuple[float, float]] = {}
    not_run: dict[tuple, str] = {}
    ceilings: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        ceilings.append(ceiling(sets, args.seconds, args.device, args.dtype))
        for setup in setups:
            try:
                res, memory[(rnd, setup)] = run_setup(setup, sets, cells, args, env, peers)
            except PeerUnavailable as exc:
                not_run[(rnd, setup)] = str(exc)
                print(f"... {setup} not run: {exc}", file=sys.stderr, flush=True)
                continue
            results.update({(rnd, setup) + key: r for key, r in res.items()})
    print(f"\nHTTP load, {WORKERS} Gunicorn workers per setup, {args.seconds:g}s per cell, {os.cpu_count()} cores, "
          f"model on {args.device} at {args.dtype}; cells are clients x texts per request, "
          f"(0.50x) is texts/s against shm-embed's")
    print(report(results, not_run, setups, sets, cells, args.rounds))
    print("\nin-process ceiling (SentenceTransformer.encode, best batch size), measured before each round:")
    for rnd, ceil in enumerate(ceilings, 1):
        for name in sets:
            rate, bs = ceil[name]
            print(f"  round {rnd} {name}: {rate:.1f} texts/s at batch {bs}; one text alone "
                  f"{ceil[name + '_single_ms']:.1f} ms")
    print(f"\ntotal host memory with {WORKERS} workers (every process of the setup, 1 s after the load):")
    for (rnd, setup), (rss, pss) in memory.items():
        print(f"  round {rnd} {setup}: PSS {pss:.0f} MiB (RSS summed {rss:.0f} MiB)")
    if "shm-embed" in setups and (16, 1) in cells:
        print("\nshm-embed, 16 single-text clients, against the in-process ceiling:")
        for rnd, ceil in enumerate(ceilings, 1):
            if (rnd, "shm-embed") in not_run:
                continue
            parts = [f"{name} {results[(rnd, 'shm-embed', name, 16, 1)]['tps'] / ceil[name][0]:.2f} of ceiling"
                     for name in sets]
            print(f"  round {rnd}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
