"""Protocol overhead: a worker's end-to-end time for one short text minus the
sidecar's own measured compute time, next to the original design's transport
(multiprocessing BaseManager over TCP, pickled) serving the same model.

    python bench/protocol_overhead.py [--requests 400] [--model PATH]

Both servers run at once; requests alternate between them so both see the
same machine state.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from _common import pct, running_sidecar, short_queries, table

AUTHKEY = b"embedding_secret"


class _Service:
    """What the original server exposed: encode on the server, pickled back."""

    def __init__(self, model_path: str, threads: int):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_path, device="cpu")

    def generate_embeddings(self, texts):
        t0 = time.perf_counter_ns()
        vecs = self.model.encode(texts, batch_size=32)
        return vecs, time.perf_counter_ns() - t0


def serve_basemanager(model_path: str, threads: int, port_q) -> None:
    from multiprocessing.managers import BaseManager

    service = _Service(model_path, threads)

    class Manager(BaseManager):
        pass

    Manager.register("EmbeddingService", callable=lambda: service)
    mgr = Manager(address=("127.0.0.1", 0), authkey=AUTHKEY)
    server = mgr.get_server()
    port_q.put(server.address[1])
    server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--block", type=int, default=25, help="requests per transport before switching (1: interleave)")
    args = ap.parse_args()
    from shm_protocol.model_files import bundled_model_path
    from shm_protocol import EmbeddingClient

    model_path = args.model or str(bundled_model_path())
    texts = short_queries(args.requests, seed=3)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    bm = ctx.Process(target=serve_basemanager, args=(model_path, args.threads, q), daemon=True)
    bm.start()
    port = q.get(timeout=300)
    from multiprocessing.managers import BaseManager

    class Manager(BaseManager):
        pass

    Manager.register("EmbeddingService")
    with running_sidecar(args.model, SHM_EMBED_TORCH_THREADS=args.threads) as (settings, _):
        client = EmbeddingClient.connect(settings)
        mgr = Manager(address=("127.0.0.1", port), authkey=AUTHKEY)
        mgr.connect()
        remote = mgr.EmbeddingService()
        for t in texts[:20]:  # warm both
            client.embed_detailed([t])
            remote.generate_embeddings([t])
        shm_over, shm_e2e, bm_over, bm_e2e, shm_transport = [], [], [], [], []
        # Requests go in alternating blocks, so each transport sees the same
        # machine state; within a block they come back to back, as from a
        # worker under steady traffic.
        for b in range(0, len(texts), args.block):
            for t in texts[b: b + args.block]:
                t0 = time.perf_counter_ns()
                res = client.embed_detailed([t])
                e2e = time.perf_counter_ns() - t0
                shm_e2e.append(e2e / 1e3)
                shm_over.append((e2e - res.compute_ns) / 1e3)
                # The original tokenized inside the server (inside its measured time);
                # shm-embed moved that work to the worker. Without it: the transport alone.
                shm_transport.append((e2e - res.compute_ns - res.tokenize_ns) / 1e3)
            for t in texts[b: b + args.block]:
                t0 = time.perf_counter_ns()
                _, compute_ns = remote.generate_embeddings([t])
                e2e = time.perf_counter_ns() - t0
                bm_e2e.append(e2e / 1e3)
                bm_over.append((e2e - compute_ns) / 1e3)
        client.close()
    bm.terminate()
    q.close()
    rows = [
        ["shm-embed (shared memory + semaphores)", f"{pct(shm_over, 50):.1f}", f"{pct(shm_over, 99):.1f}",
         f"{pct(shm_e2e, 50) / 1e3:.2f}"],
        ["shm-embed, transport only (minus worker tokenization)", f"{pct(shm_transport, 50):.1f}",
         f"{pct(shm_transport, 99):.1f}", "-"],
        ["BaseManager over TCP (pickled)", f"{pct(bm_over, 50):.1f}", f"{pct(bm_over, 99):.1f}",
         f"{pct(bm_e2e, 50) / 1e3:.2f}"],
    ]
    print(f"\nprotocol overhead, one short text, {args.requests} requests each in blocks of {args.block}, "
          f"model {os.path.basename(model_path)}")
    print(table(rows, ["transport", "overhead p50 us", "overhead p99 us", "end-to-end p50 ms"]))
    print(f"ratio (BaseManager / shm-embed) at p50: {pct(bm_over, 50) / pct(shm_over, 50):.2f}x, "
          f"transport only {pct(bm_over, 50) / pct(shm_transport, 50):.2f}x")


if __name__ == "__main__":
    main()
