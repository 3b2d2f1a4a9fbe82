"""A worker process for the snapshot tests: ``python tests/snapshot_worker.py DIM [STORE_KWARGS_JSON]``.

A CollectionStore searched with given vectors (no sidecar: the client only
names a model), at the location in the environment's ``SNAPSHOT_WORKER_STORE``
(a SQLite data directory or a PostgreSQL URL, which may hold a password).
Reads one JSON command per line, answers one JSON line:

- ``{"op": "warm"}`` -> ``{"passages": n}``
- ``{"op": "search", "name", "vector", "top_k", "filter"}`` -> ``{"results": [...], "generation": g, "seq": s}``
  (``generation`` is the snapshot generation it served, null without one)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from retrieval.collections.store import CollectionStore

#: The variable that names the store.
LOCATION = "SNAPSHOT_WORKER_STORE"


class VectorClient:
    """A client for stores written and searched with given vectors: it embeds nothing."""

    def __init__(self, dim: int, model: str = "test-vectors"):
        self.dim, self.name = dim, model

    def info(self) -> dict:
        return {"model": self.name, "dimension": self.dim}


def served(store: CollectionStore, name: str) -> tuple[int | None, int]:
    """(the snapshot generation the store serves the collection from, or None; the change seq it applied)."""
    lo = store._loaded[name]
    return getattr(lo.index, "generation", None), lo.seq


def main() -> None:
    dim = int(sys.argv[1])
    kwargs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    store = CollectionStore(os.environ[LOCATION], VectorClient(dim), **kwargs)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        if cmd["op"] == "warm":
            out = {"passages": store.warm()}
        else:
            vector = np.asarray(cmd["vector"], dtype=np.float32)
            res = store.search_vector(cmd["name"], vector, cmd.get("top_k", 10), cmd.get("filter"))
            gen, seq = served(store, cmd["name"])
            out = {"results": [[r["id"], r["score"]] for r in res], "generation": gen, "seq": seq}
        print(json.dumps(out), flush=True)
    store.close()


if __name__ == "__main__":
    main()
