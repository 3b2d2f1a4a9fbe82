"""Reranking and a second model, side by side in one run.

    python bench/rerank.py [--requests 60] [--blocks 6] [--device cpu|cuda]

1. Rerank of 1 query x 32 passages: ``POST /rerank`` through Gunicorn and a
   sidecar serving an embedding model and a cross-encoder, against
   ``CrossEncoder.predict`` of the same pairs in this process, alternating
   request by request: p50/p99 milliseconds and pairs per second of each.
   The cross-encoder is the bundled MiniLM's weights with a fresh one-label
   head (what a reranker of that size costs; its scores mean nothing). Every
   HTTP answer is checked against predict (1e-5).
2. Embedding throughput with a second model loaded: batches of 32 short
   queries through the client to two identical sidecars serving one model
   and to one serving the same model beside the cross-encoder, in rotating
   blocks (only one works at a time): texts per second of each; the ratio of
   the identical two is the noise the third is judged against.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, passages, pct, running_sidecar, short_queries, stop_process, table
from http_load import start_gunicorn


def rerank_http(conn, query: str, docs: list[str]) -> list[dict]:
    conn.request("POST", "/rerank", json.dumps({"query": query, "texts": docs}),
                 {"content-type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
    return json.loads(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=60, help="rerank requests (and predict calls) to time")
    ap.add_argument("--blocks", type=int, default=9, help="rotating throughput blocks per sidecar")
    ap.add_argument("--batches", type=int, default=8, help="batches of 32 texts per throughput block")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from sentence_transformers import CrossEncoder

    from shm_protocol.client import EmbeddingClient
    from shm_protocol.model_files import bundled_model_path
    from sidecar.tiny import make_cross_encoder

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # as the sidecar runs its models
    work = Path(tempfile.mkdtemp(prefix="shm-embed-rerank-"))
    ce_path = make_cross_encoder(work / "minilm-reranker")
    minilm = bundled_model_path()
    ce = CrossEncoder(str(ce_path), device=args.device)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    two = {"SHM_EMBED_MODELS": f"minilm={minilm},ce={ce_path}", "SHM_EMBED_DEVICE": args.device,
           "SHM_EMBED_TORCH_THREADS": str(threads)}

    queries = short_queries(args.requests + 5, seed=31)
    docs = passages(32, seed=32, lo=20, hi=40)  # about 30-word passages
    http_ms, local_ms = [], []
    worst = 0.0
    with running_sidecar(**two) as (settings, _):
        proc, base = start_gunicorn(str(REPO / "gunicorn.conf.py"), dict(env, **two,
                                                                         SHM_EMBED_NAMESPACE=settings.namespace))
        try:
            host, port = base.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            for i, q in enumerate(queries):
                t0 = time.perf_counter()
                got = rerank_http(conn, q, docs)
                t1 = time.perf_counter()
                want = ce.predict([(q, d) for d in docs], batch_size=32)
                t2 = time.perf_counter()
                scores = np.empty(len(docs), np.float32)
                for r in got:
                    scores[r["index"]] = r["score"]
                worst = max(worst, float(np.abs(scores - want).max()))
                if i >= 5:  # warm-up
                    http_ms.append((t1 - t0) * 1e3)
                    local_ms.append((t2 - t1) * 1e3)
            conn.close()
        finally:
            stop_process(proc, timeout=60)

    texts = short_queries(32 * args.batches, seed=33)
    # Two identical one-model sidecars and one with the reranker beside the
    # same model, in rotating blocks: the spread between the two identical
    # ones is the noise the third is judged against.
    names = ("one model (a)", "one model (b)", "with a reranker loaded")
    rates: dict[str, list[float]] = {k: [] for k in names}
    one = {"SHM_EMBED_MODEL": str(minilm), "SHM_EMBED_DEVICE": args.device, "SHM_EMBED_TORCH_THREADS": str(threads)}
    with running_sidecar(**one) as (s1, _), running_sidecar(**one) as (s2, _), running_sidecar(**two) as (s3, _):
        with EmbeddingClient.connect(s1) as c1, EmbeddingClient.connect(s2) as c2, \
                EmbeddingClient.connect(s3) as c3:
            clients = dict(zip(names, (c1, c2, c3)))
            for client in clients.values():
                for k in range(args.batches):  # warm every batch shape
                    client.embed(texts[32 * k: 32 * (k + 1)])
            for b in range(args.blocks):
                for name in names[b % 3:] + names[: b % 3]:
                    client = clients[name]
                    t0 = time.perf_counter()
                    for k in range(args.batches):
                        client.embed(texts[32 * k: 32 * (k + 1)])
                    rates[name].append(len(texts) / (time.perf_counter() - t0))

    n = len(docs)
    rows = [[name, f"{pct(v, 50):.1f}", f"{pct(v, 99):.1f}", f"{n / (pct(v, 50) / 1e3):.0f}"]
            for name, v in (("POST /rerank through shm-embed", http_ms), ("CrossEncoder.predict here", local_ms))]
    print(f"\nRerank 1 query x {n} passages (~30 words), {len(http_ms)} alternating requests, device {args.device}, "
          f"{threads} torch threads; largest score difference {worst:.2e}")
    print(table(rows, ["", "p50 ms", "p99 ms", "pairs/s at p50"]))
    print(f"HTTP / in-process p50: {pct(http_ms, 50) / pct(local_ms, 50):.2f}")
    a1, a2, b = (float(np.median(rates[k])) for k in names)
    print(f"\nEmbedding throughput, batches of 32 short queries, {args.blocks} rotating blocks of {len(texts)}")
    print(table([[k, f"{np.median(v):.1f}", f"{min(v):.1f}", f"{max(v):.1f}"] for k, v in rates.items()],
                ["sidecar", "median texts/s", "min", "max"]))
    print(f"ratio with a reranker loaded / one model: {b / ((a1 + a2) / 2):.3f}; "
          f"between the two one-model sidecars (noise): {min(a1, a2) / max(a1, a2):.3f}")
    if worst > 1e-5:
        raise SystemExit(f"a rerank score differs from CrossEncoder.predict by {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
