"""Protocol overhead, every transport side by side in one run: a worker's
end-to-end time for one short text minus the server's own measured compute.

Transports, each serving the same work:

* shm-embed: shared memory and semaphores, under the spin policy and the
  park policy (see SHM_EMBED_WAIT_POLICY);
* BaseManager over TCP, pickled (the original system's transport);
* HTTP/1.1 on loopback with a kept-alive connection (how a worker reaches a
  model server such as TEI or infinity).

Work: the synthetic compute (a sleep of N microseconds that leaves the CPU
free, as a GPU does) at 0 and 2 ms, and the real model on the CPU. The
other servers tokenize inside their measured compute, as the original did;
shm-embed's worker tokenizes before it sends, so its overhead includes the
worker's tokenization (the "transport only" row takes it out).

    python bench/protocol_overhead.py [--requests 400] [--block 25] [--work synthetic:0,synthetic:2000,model]

Requests go in alternating blocks, so each transport sees the same machine
state; within a block they come back to back, as from a worker under steady
traffic.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import numpy as np

from _common import pct, running_sidecar, short_queries, table

AUTHKEY = b"embedding_secret"


class Work:
    """What every non-shm server runs per request: tokenize and compute (or
    encode with the model), timed inside the server."""

    def __init__(self, kind: str, us: int, model_path: str, threads: int):
        self.kind, self.us = kind, us
        if kind == "model":
            import torch
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(threads)
            self.model = SentenceTransformer(model_path, device="cpu")
        else:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
            self.tok.enable_truncation(max_length=256)

    def __call__(self, texts):
        t0 = time.perf_counter_ns()
        if self.kind == "model":
            vecs = self.model.encode(texts, batch_size=32)
        else:
            from sidecar.synthetic import SPIN_TAIL_NS, synthetic_vector

            end = time.monotonic_ns() + self.us * 1000
            encs = self.tok.encode_batch(texts)
            vecs = np.stack([synthetic_vector(np.asarray(e.ids), 384) for e in encs])
            left = end - time.monotonic_ns() - SPIN_TAIL_NS
            if left > 0:
                time.sleep(left / 1e9)
            while time.monotonic_ns() < end:
                pass
        return vecs, time.perf_counter_ns() - t0


def serve_basemanager(kind: str, us: int, model_path: str, threads: int, port_q) -> None:
    from multiprocessing.managers import BaseManager

    work = Work(kind, us, model_path, threads)

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


def serve_http(kind: str, us: int, model_path: str, threads: int, port_q) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    work = Work(kind, us, model_path, threads)

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


def run_work(kind: str, us: int, args, model_path: str, texts: list[str]) -> list[list]:
    from multiprocessing.managers import BaseManager

    from shm_protocol import EmbeddingClient

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(kind, us, model_path, args.threads, q), daemon=True)
             for fn in (serve_basemanager, serve_http)]
    ports = []
    for p in procs:
        p.start()
        ports.append(q.get(timeout=300))

    class Manager(BaseManager):
        pass

    Manager.register("EmbeddingService")
    mgr = Manager(address=("127.0.0.1", ports[0]), authkey=AUTHKEY)
    mgr.connect()
    remote = mgr.EmbeddingService()
    conn = http.client.HTTPConnection("127.0.0.1", ports[1])
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as HTTP client libraries set it

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

    sidecar_env = {"SHM_EMBED_SYNTHETIC_US": str(us if kind == "synthetic" else -1),
                   "SHM_EMBED_TORCH_THREADS": str(args.threads)}
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
            transports["HTTP/1.1 on loopback, kept alive"] = via_http
            results = {name: ([], [], []) for name in transports}
            for fn in transports.values():  # warm every path
                for t in texts[:20]:
                    fn(t)
            for b in range(0, len(texts), args.block):
                for name, fn in transports.items():
                    over, e2e, transport = results[name]
                    for t in texts[b: b + args.block]:
                        total, compute, tok = fn(t)
                        over.append((total - compute) / 1e3)
                        e2e.append(total / 1e3)
                        transport.append((total - compute - tok) / 1e3)
    finally:
        for p in procs:
            p.terminate()
        conn.close()
        q.close()
        q.join_thread()
    base = pct(results["BaseManager over TCP (pickled)"][0], 50)
    for name, (over, e2e, transport) in results.items():
        rows.append([name, f"{pct(over, 50):.1f}", f"{pct(over, 99):.1f}",
                     f"{pct(transport, 50):.1f}" if name.startswith("shm") else "-",
                     f"{pct(e2e, 50) / 1e3:.3f}", f"{base / pct(over, 50):.2f}x"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--block", type=int, default=25, help="requests per transport before switching (1: interleave)")
    ap.add_argument("--work", default="synthetic:0,synthetic:2000,model",
                    help="comma-separated: synthetic:<microseconds> or model")
    args = ap.parse_args()
    from shm_protocol.model_files import bundled_model_path, model_name

    model_path = args.model or str(bundled_model_path())
    texts = short_queries(args.requests, seed=3)
    for item in args.work.split(","):
        kind, _, us = item.partition(":")
        rows = run_work(kind, int(us or 0), args, model_path, texts)
        what = f"synthetic compute {int(us) / 1000:g} ms (CPU free)" if kind == "synthetic" else \
            f"{model_name(Path(model_path))} on the CPU"
        print(f"\n{what}: one short text, {args.requests} requests per transport in blocks of {args.block}")
        print(table(rows, ["transport", "overhead p50 us", "overhead p99 us", "transport only p50 us",
                           "end-to-end p50 ms", "BaseManager / this, p50"]))


if __name__ == "__main__":
    main()
