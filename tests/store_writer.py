"""A writer process for the collection tests: ``python tests/store_writer.py MODE LOCATION NAME ARGS...``
(LOCATION: a SQLite data directory or a PostgreSQL URL).

MODE ``docs``: upsert ``batches`` batches of ``per_batch`` documents with ids
``{tag}-{n}`` (embedded through the sidecar of the environment's namespace),
and in every batch replace the document ``shared``.
MODE ``big``: write batches of ``per_batch`` documents of 3 passages each with
random vectors, forever, printing each committed batch number (for kill tests).
"""

from __future__ import annotations

import sys

import numpy as np

from retrieval.collections.store import CollectionOptions, CollectionStore, parse_documents
from shm_protocol.client import EmbeddingClient


def main() -> None:
    mode, location, name, tag, batches, per_batch = sys.argv[1:7]
    batches, per_batch = int(batches), int(per_batch)
    client = EmbeddingClient.connect()
    store = CollectionStore(location, client)
    if mode == "docs":
        for b in range(batches):
            docs = [{"id": f"{tag}-{b * per_batch + i}", "text": f"document {tag} {b} {i} about topic {i}",
                     "metadata": {"writer": tag, "batch": b}} for i in range(per_batch)]
            docs.append({"id": "shared", "text": f"shared document last written by {tag} batch {b}",
                         "metadata": {"writer": tag}})
            store.upsert(name, docs)
    elif mode == "big":
        dim = store.model()[1]
        opts = CollectionOptions(passage_words=8, overlap_words=0)
        rng = np.random.default_rng()
        b = 0
        while True:
            raw = [{"id": f"{tag}-{b}-{i}", "text": " ".join(f"w{j}" for j in range(24)), "metadata": {"batch": b}}
                   for i in range(per_batch)]
            docs = parse_documents(raw, opts)
            vecs = rng.standard_normal((3 * per_batch, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store.write_embedded(name, docs, vecs)
            print(b, flush=True)
            b += 1
    store.close()
    client.close()


if __name__ == "__main__":
    main()
