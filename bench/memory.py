"""Resident memory of a worker process: one with the shm-embed client
attached (tokenizer + rings, no torch), against one that loads the model.

    python bench/memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _common import REPO, passages, running_sidecar, table

CLIENT = r"""
import json, sys
from shm_protocol import EmbeddingClient, Settings
c = EmbeddingClient.connect(Settings.from_env())
texts = json.loads(sys.stdin.read())
for i in range(0, len(texts), 16):
    c.embed(texts[i:i+16])
print(json.dumps({"torch_loaded": "torch" in sys.modules, "rss": open("/proc/self/status").read()}))
"""

LOCAL = r"""
import json, sys, os
import torch
torch.set_num_threads(1)
from sentence_transformers import SentenceTransformer
from shm_protocol.model_files import bundled_model_path
m = SentenceTransformer(str(bundled_model_path()), device="cpu")
texts = json.loads(sys.stdin.read())
for i in range(0, len(texts), 16):
    m.encode(texts[i:i+16])
print(json.dumps({"torch_loaded": True, "rss": open("/proc/self/status").read()}))
"""


def measure(code: str, env: dict, texts: list[str]) -> tuple[float, bool]:
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    rss = next(int(line.split()[1]) for line in doc["rss"].splitlines() if line.startswith("VmRSS:")) / 1024
    return rss, doc["torch_loaded"]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Resident memory of a client worker, a model worker and the sidecar.")
    ap.add_argument("--passages", type=int, default=200, help="passages each worker embeds before it is measured")
    args = ap.parse_args()
    texts = passages(args.passages, seed=4)
    with running_sidecar() as (settings, proc):
        env = dict(os.environ, SHM_EMBED_NAMESPACE=settings.namespace,
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        client_rss, client_torch = measure(CLIENT, env, texts)
        sidecar_rss = float(open(f"/proc/{proc.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
    local_rss, _ = measure(LOCAL, env, texts)
    rows = [
        ["worker with the shm-embed client", f"{client_rss:.0f}", "yes" if client_torch else "no"],
        ["worker that loads the model itself", f"{local_rss:.0f}", "yes"],
        ["the sidecar (one per host)", f"{sidecar_rss:.0f}", "yes"],
    ]
    print(f"\nresident memory after embedding {args.passages} passages")
    print(table(rows, ["process", "RSS MiB", "torch imported"]))
    print(f"client worker / model worker: {client_rss / local_rss:.2f}")
    for n in (4, 8, 16):
        print(f"{n} workers: shm-embed {n * client_rss + sidecar_rss:.0f} MiB total, "
              f"model per worker {n * local_rss:.0f} MiB total")


if __name__ == "__main__":
    main()
