"""One client, side by side: an HTTP request to shm-embed (Gunicorn + the
sidecar) against ``SentenceTransformer.encode`` of the same text in this
process, alternating request by request, so both see the same machine at the
same moment.

    python bench/http_latency.py [--pairs 300]

Prints p50/p99 of each and of the per-pair difference (HTTP minus
in-process): what HTTP, Gunicorn, tokenization and the shared-memory round
trip add to one text's embedding.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys

from _common import REPO, pct, running_sidecar, short_queries, stop_process, table
from http_load import start_gunicorn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    args = ap.parse_args()
    import time

    import torch
    from sentence_transformers import SentenceTransformer

    from shm_protocol.model_files import bundled_model_path

    texts = short_queries(args.pairs + 20, seed=21)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(os.cpu_count())  # as the sidecar runs its model
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    with running_sidecar() as (settings, _):
        proc, base = start_gunicorn(str(REPO / "gunicorn.conf.py"), dict(env, SHM_EMBED_NAMESPACE=settings.namespace))
        try:
            host, port = base.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            http_ms, local_ms, diff_ms = [], [], []
            for i, text in enumerate(texts):
                body = json.dumps({"inputs": [text], "normalize": True})
                t0 = time.perf_counter()
                conn.request("POST", "/embed", body, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                t1 = time.perf_counter()
                model.encode([text], normalize_embeddings=True)
                t2 = time.perf_counter()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                if i >= 20:  # warm-up
                    http_ms.append((t1 - t0) * 1e3)
                    local_ms.append((t2 - t1) * 1e3)
                    diff_ms.append(http_ms[-1] - local_ms[-1])
            conn.close()
        finally:
            stop_process(proc, timeout=60)
    rows = [[name, f"{pct(v, 50):.2f}", f"{pct(v, 99):.2f}"] for name, v in
            (("HTTP /embed through shm-embed", http_ms), ("encode in this process", local_ms),
             ("difference, pair by pair", diff_ms))]
    print(f"\nOne client, {len(diff_ms)} alternating pairs, short queries, {os.cpu_count()} cores")
    print(table(rows, ["", "p50 ms", "p99 ms"]))


if __name__ == "__main__":
    sys.exit(main())
