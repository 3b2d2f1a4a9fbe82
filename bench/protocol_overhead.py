"""Protocol overhead, every transport side by side in one run: a worker's
end-to-end time for one short text minus the server's own measured compute.

Transports, each serving the same work:

* shm-embed: shared memory and semaphores, under the spin policy and the
  park policy (see SHM_EMBED_WAIT_POLICY);
* BaseManager over TCP, pickled (the original system's transport);
* Gunicorn's dirty workers: a DirtyClient on the dirty arbiter's Unix socket,
  which relays to the dirty worker holding the work (the closest peer: how a
  Gunicorn app shares one model between its workers without this project);
* HTTP/1.1 on loopback with a kept-alive connection (how a worker reaches a
  model server such as TEI or infinity).

Work: the synthetic compute (a sleep of N microseconds that leaves the CPU
free, as a GPU does) at 0 and 2 ms, and the real model on the CPU. The
other servers tokenize inside their measured compute, as the original did;
shm-embed's worker tokenizes before it sends, so its overhead includes the
worker's tokenization (the "transport only" row takes it out).

    python bench/protocol_overhead.py [--requests 400] [--block 25] [--work synthetic:0,synthetic:2000,model]
                                      [--gap-us 2000] [--device cpu|cuda]

Requests go in alternating blocks, so each transport sees the same machine
state; within a block they come ``--gap-us`` apart (2 ms by default, as from
a worker serving traffic; 0 for back to back). The floor row is a plain pair
of POSIX semaphores between two processes (post, the server wakes, computes
the same synthetic work, posts back): what no transport can beat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, pct, running_sidecar, short_queries, stop_process, table
from overhead_work import Work

AUTHKEY = b"embedding_secret"


def serve_basemanager(kind: str, us: int, model_path: str, threads: int, device: str, port_q) -> None:
    from multiprocessing.managers import BaseManager

    work = Work(kind, us, model_path, threads, device)

    class Service:
        def generate_embeddings(self, texts):
            return work(texts)

    service = Service()

    class Manager(BaseManager):
        pass

    Manager.register("EmbeddingService", callable=lambda: service)
    mgr = Manager(address=("127.0.0.1", 0), authkey=AUTHKEY)
    server = mgr.get_server()
    port_q.put(server.address[1])
    server.serve_forever()


def serve_pingpong(us: int, names: tuple[str, str], compute, ready) -> None:
    """The floor: wait on one semaphore, do the synthetic work, post the other."""
    from shm_protocol import hotpath
    from sidecar.synthetic import SPIN_TAIL_NS

    req, resp = (hotpath.semaphore(n) for n in names)
    ready.set()
    while True:
        if not req.wait(1.0):
            continue
        t0 = time.monotonic_ns()
        end = t0 + us * 1000
        left = end - time.monotonic_ns() - SPIN_TAIL_NS
        if left > 0:
            time.sleep(left / 1e9)
        while time.monotonic_ns() < end:
            pass
        compute[0] = time.monotonic_ns() - t0
        resp.post()


def serve_http(kind: str, us: int, model_path: str, threads: int, device: str, port_q) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    work = Work(kind, us, model_path, threads, device)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a worker's connection pool does
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            vecs, compute_ns = work(json.loads(body)["inputs"])
            out = json.dumps(vecs.tolist()).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.send_header("x-compute-ns", str(compute_ns))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_q.put(server.server_address[1])
    server.serve_forever()


DIRTY_APP = "bench.dirty_app:OverheadApp"


def start_dirty(kind: str, us: int, model_path: str, args, socket_file: str) -> subprocess.Popen:
    """Gunicorn with one dirty worker running the work (bench/dirty_app.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               BENCH_WORK_KIND=kind, BENCH_WORK_US=str(us), BENCH_MODEL_PATH=model_path,
               BENCH_THREADS=str(args.threads), BENCH_DEVICE=args.device, BENCH_SOCKET_FILE=socket_file)
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
         "--dirty-workers", "1", "--dirty-threads", "1", "--dirty-timeout", "300", "--dirty-app", DIRTY_APP,
         "--log-level", "warning", "bench.dirty_app:idle_application"],
        cwd=REPO / "bench", env=env, start_new_session=True)  # not the project's gunicorn.conf.py


def dirty_client(proc: subprocess.Popen, socket_file: str):
    from gunicorn.dirty.client import DirtyClient

    deadline = time.monotonic() + 300
    while not os.path.exists(socket_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the dirty-worker server did not start")
        time.sleep(0.1)
    with open(socket_file) as f:
        return DirtyClient(f.read(), timeout=120)


def run_work(kind: str, us: int, args, model_path: str, texts: list[str]) -> list[list]:
    from multiprocessing.managers import BaseManager

    from shm_protocol import EmbeddingClient

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(kind, us, model_path, args.threads, args.device, queue), daemon=True)
             for fn in (serve_basemanager, serve_http)]
    tmp = tempfile.TemporaryDirectory(prefix="overhead-")
    socket_file = os.path.join(tmp.name, "dirty-socket")
    dirty = start_dirty(kind, us, model_path, args, socket_file)
    ports = []
    for proc in procs:
        proc.start()
        ports.append(queue.get(timeout=300))

    class Manager(BaseManager):
        pass

    Manager.register("EmbeddingService")
    mgr = Manager(address=("127.0.0.1", ports[0]), authkey=AUTHKEY)
    mgr.connect()
    remote = mgr.EmbeddingService()
    import posix_ipc

    from shm_protocol import hotpath

    ping_names = tuple(f"/shm-embed-bench-pp-{os.getpid()}-{k}" for k in ("req", "resp"))
    made = [posix_ipc.Semaphore(n, posix_ipc.O_CREX, 0o600, 0) for n in ping_names]
    compute = ctx.RawArray("Q", 1)
    ping_ready = ctx.Event()
    if kind == "synthetic":
        procs.append(ctx.Process(target=serve_pingpong, args=(us, ping_names, compute, ping_ready), daemon=True))
        procs[-1].start()
        ping_ready.wait(60)
    ping_req, ping_resp = (hotpath.semaphore(n) for n in ping_names)

    def via_pingpong(t):
        t0 = time.perf_counter_ns()
        ping_req.post()
        ping_resp.wait(10.0)
        return time.perf_counter_ns() - t0, int(compute[0]), 0

    conn = http.client.HTTPConnection("127.0.0.1", ports[1])
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as HTTP client libraries set it
    dirty_conn = dirty_client(dirty, socket_file)

    def via_basemanager(t):
        t0 = time.perf_counter_ns()
        _, compute_ns = remote.generate_embeddings([t])
        return time.perf_counter_ns() - t0, compute_ns, 0

    def via_http(t):
        t0 = time.perf_counter_ns()
        conn.request("POST", "/embed", body=json.dumps({"inputs": [t]}), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        np.asarray(json.loads(resp.read()), np.float32)
        return time.perf_counter_ns() - t0, int(resp.getheader("x-compute-ns")), 0

    def via_dirty(t):
        t0 = time.perf_counter_ns()
        out = dirty_conn.execute(DIRTY_APP, "embed", [t])
        np.frombuffer(out["vectors"], np.float32)
        return time.perf_counter_ns() - t0, out["compute_ns"], 0

    sidecar_env = {"SHM_EMBED_SYNTHETIC_US": str(us if kind == "synthetic" else -1),
                   "SHM_EMBED_TORCH_THREADS": str(args.threads), "SHM_EMBED_DEVICE": args.device}
    policies = ("spin", "park") if kind == "synthetic" else ("auto",)
    rows = []
    try:
        from contextlib import ExitStack

        with ExitStack() as stack:
            transports = {}
            for policy in policies:
                settings, _ = stack.enter_context(running_sidecar(args.model, SHM_EMBED_WAIT_POLICY=policy,
                                                                  **sidecar_env))
                client = EmbeddingClient.connect(settings)
                stack.callback(client.close)

                def via_shm(t, client=client):
                    t0 = time.perf_counter_ns()
                    res = client.embed_detailed([t])
                    return time.perf_counter_ns() - t0, res.compute_ns, res.tokenize_ns

                name = "shm-embed" if policy == "auto" else f"shm-embed, {policy} policy"
                transports[name] = via_shm
            transports["BaseManager over TCP (pickled)"] = via_basemanager
            transports["Gunicorn dirty worker (Unix socket)"] = via_dirty
            transports["HTTP/1.1 on loopback, kept alive"] = via_http
            if kind == "synthetic":
                transports["floor: plain semaphore ping-pong"] = via_pingpong
            gap_s = args.gap_us / 1e6
            results = {name: ([], [], []) for name in transports}
            for fn in transports.values():  # warm every path
                for t in texts[:20]:
                    fn(t)
            for b in range(0, len(texts), args.block):
                for name, fn in transports.items():
                    over, e2e, transport = results[name]
                    for t in texts[b: b + args.block]:
                        if gap_s:
                            time.sleep(gap_s)
                        total, compute_ns, tok = fn(t)
                        over.append((total - compute_ns) / 1e3)
                        e2e.append(total / 1e3)
                        transport.append((total - compute_ns - tok) / 1e3)
    finally:
        for proc in procs:
            proc.terminate()
        conn.close()
        dirty_conn.close()
        if dirty.poll() is None:  # the master and its dirty arbiter and workers: one process group
            os.killpg(dirty.pid, signal.SIGTERM)
        stop_process(dirty, timeout=60)
        tmp.cleanup()
        for sem in (ping_req, ping_resp, *made):
            sem.close()
        for n in ping_names:
            posix_ipc.unlink_semaphore(n)
        queue.close()
        queue.join_thread()
    base = pct(results["BaseManager over TCP (pickled)"][0], 50)
    shm = next(v for name, v in results.items() if name.startswith("shm"))
    for name, (over, e2e, transport) in results.items():
        rows.append([name, f"{pct(over, 50):.1f}", f"{pct(over, 99):.1f}",
                     f"{pct(transport, 50):.1f}" if name.startswith("shm") else "-",
                     f"{pct(e2e, 50) / 1e3:.3f}", f"{base / pct(over, 50):.2f}x"])
    return rows, pct(shm[0], 50)


def forward_ms(model_path: str, args, texts: list[str], batch: int, repeats: int = 30) -> float:
    """p50 of one model call of ``batch`` short texts, in this process."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(model_path, device=args.device)
    chunk = (texts * (batch // len(texts) + 1))[:batch]
    for _ in range(3):
        model.encode(chunk, batch_size=batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.encode(chunk, batch_size=batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return pct(times, 50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="where the model runs, for every transport: cpu or cuda")
    ap.add_argument("--block", type=int, default=25, help="requests per transport before switching (1: interleave)")
    ap.add_argument("--work", default="synthetic:0,synthetic:2000,model",
                    help="comma-separated: synthetic:<microseconds> or model")
    ap.add_argument("--gap-us", type=int, default=2000,
                    help="pause before each request, in microseconds (0: back to back)")
    args = ap.parse_args()
    from shm_protocol.model_files import bundled_model_path, model_name

    model_path = args.model or str(bundled_model_path())
    texts = short_queries(args.requests, seed=3)
    for item in args.work.split(","):
        kind, _, us = item.partition(":")
        rows, shm_p50_us = run_work(kind, int(us or 0), args, model_path, texts)
        what = f"synthetic compute {int(us) / 1000:g} ms (CPU free)" if kind == "synthetic" else \
            f"{model_name(Path(model_path))} on {'the CPU' if args.device == 'cpu' else args.device}"
        gap = f"{args.gap_us} us apart" if args.gap_us else "back to back"
        print(f"\n{what}: one short text, {args.requests} requests per transport in blocks of {args.block}, "
              f"{gap}")
        print(table(rows, ["transport", "overhead p50 us", "overhead p99 us", "transport only p50 us",
                           "end-to-end p50 ms", "BaseManager / this, p50"]))
        if kind == "model":  # the overhead against the forward passes it rides on
            shares = []
            for batch in (1, 64):
                ms = forward_ms(model_path, args, texts, batch)
                shares.append(f"batch {batch}: {ms:.2f} ms (shm-embed's overhead p50 = {shm_p50_us / 10 / ms:.1f}%)")
            print("model call p50 in one process, " + "; ".join(shares))


if __name__ == "__main__":
    main()
