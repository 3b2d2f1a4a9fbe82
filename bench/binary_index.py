"""Binary collections against flat ones: the memory of the index and recall@10.

    python bench/binary_index.py                                   # 200k synthetic passages, and the labelled set
    python bench/binary_index.py --passages 20000 --queries 50     # quicker
    python bench/binary_index.py --no-labelled                     # without the model

Everything goes through the store (SQLite in a temporary directory), with a
snapshot built for each collection, so that a binary collection is served as
it is in production: its sign-bit codes and its float vectors (``vectors.npy``)
mapped from the snapshot, the float rows read only for the candidates.

1. The labelled set (``bench/data/labelled_retrieval.jsonl``: 40 queries, each
   with its relevant passage among 400), embedded with the bundled model in this
   process: recall@10 of a flat and of a binary collection.
2. Synthetic unit vectors in clusters (``--passages`` of ``--dim``, as
   ``bench/search.py`` makes them), one passage per document; each query is a
   stored passage plus noise. Recall@10 of each collection against exact
   search, the binary one at each ``--multipliers`` value.

Memory, per collection: the snapshot's index file, which is what every search
scans and so what must stay in RAM (32 bits per dimension for flat, 1 for
binary), and for binary the float vectors file, of which a search reads only
``rescore_multiplier`` x (passages asked) rows (the store asks for 4 x top_k + 8
passages: 48 for top_k 10) from the page cache or the disk. Search p50 is
printed too, but take timings on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, pct, table  # noqa: E402

from retrieval.collections.documents import RESCORE_MULTIPLIER, Document  # noqa: E402
from retrieval.collections.snapshot_disk import generation_dir  # noqa: E402
from retrieval.collections.snapshot_files import INDEX_FILE, VECTORS_FILE, file_names  # noqa: E402
from retrieval.collections.store import CollectionStore, passages_asked  # noqa: E402
from shm_protocol.config import Settings  # noqa: E402
from shm_protocol.logs import configure_logging  # noqa: E402

LABELLED = REPO / "bench" / "data" / "labelled_retrieval.jsonl"
TOP_K = 10
#: A delta no run reaches: the snapshots are the ones the benchmark builds.
NEVER = 10**9


class VectorClient:
    """The store's client when vectors are given (``write_embedded``, ``search_vector``)."""

    def __init__(self, dim: int, model: str = "bench-vectors"):
        self.dim, self.name = dim, model

    def info(self) -> dict:
        return {"model": self.name, "dimension": self.dim}


def clustered(n: int, dim: int, rng, clusters: int = 2000) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def collection(store: CollectionStore, name: str, options: dict, ids: list[str], vecs: np.ndarray,
               batch: int = 20_000) -> dict:
    """Write the passages (one per document) into a new collection, build its snapshot;
    returns the sizes of the snapshot's files."""
    store.create(name, options)
    for a in range(0, len(ids), batch):
        docs = [Document(doc_id, "x", None, {}, [(0, 1)]) for doc_id in ids[a:a + batch]]
        store.write_embedded(name, docs, vecs[a:a + batch])
    with store.db.read() as conn:
        cid = store._row(conn, name).cid
    meta = store.snapshots.build(cid)
    folder = generation_dir(store.snapshots.collection_dir(cid), meta["generation"])
    return {f: (folder / f).stat().st_size for f in file_names(meta["kind"])}


def recall_at_10(store: CollectionStore, name: str, qvecs: np.ndarray, relevant: list[set[str]]) -> tuple:
    """(mean recall@10, search p50 ms) of the collection's answers."""
    found, times = [], []
    for qv, want in zip(qvecs, relevant):
        t0 = time.perf_counter()
        hits = store.search_vector(name, qv, TOP_K)
        times.append(time.perf_counter() - t0)
        found.append(len({h["id"] for h in hits} & want) / len(want))
    return float(np.mean(found)), pct(times, 50) * 1e3


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def memory_rows(label: str, sizes: dict, dim: int, multiplier: int | None, n: int) -> list:
    """One table row: the index's bytes (what searches scan, held in RAM), the float vectors' file and
    what one search reads of it."""
    index = sizes[INDEX_FILE]
    vectors = sizes.get(VECTORS_FILE)
    read = None if multiplier is None else multiplier * passages_asked(TOP_K, n) * dim * 4
    return [label, mib(index), f"{8 * index / max(1, n * dim):.2f}", "-" if vectors is None else mib(vectors),
            "-" if read is None else f"{read / 1024:.0f}"]


def labelled_bench(data: Path) -> list:
    from sentence_transformers import SentenceTransformer

    from shm_protocol.model_files import bundled_model_path

    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    queries = [r for r in rows if r["kind"] == "query"]
    passages = [r for r in rows if r["kind"] == "passage"]
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    vecs = model.encode([p["text"] for p in passages], normalize_embeddings=True, batch_size=64)
    qvecs = model.encode([q["text"] for q in queries], normalize_embeddings=True, batch_size=64)
    store = CollectionStore(data / "labelled", VectorClient(vecs.shape[1]), snapshot_delta=NEVER)
    out = []
    try:
        relevant = [set(q["relevant"]) for q in queries]
        for kind in ("flat", "binary"):
            sizes = collection(store, kind, {"index": kind}, [p["id"] for p in passages], vecs)
            recall, p50 = recall_at_10(store, kind, qvecs, relevant)
            multiplier = RESCORE_MULTIPLIER if kind == "binary" else None
            out.append(["labelled", *memory_rows(kind, sizes, vecs.shape[1], multiplier, len(passages)),
                        f"{recall:.3f}", f"{p50:.2f}"])
    finally:
        store.close()
    return out


def synthetic_bench(data: Path, n: int, dim: int, nq: int, multipliers: list[int]) -> list:
    rng = np.random.default_rng(7)
    vecs = clustered(n, dim, rng)
    ids = [f"d{i}" for i in range(n)]
    picks = rng.integers(0, n, nq)
    qvecs = vecs[picks] + 0.3 * rng.standard_normal((nq, dim)).astype(np.float32) / np.sqrt(dim)
    qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
    exact = np.argsort(-(qvecs @ vecs.T), axis=1, kind="stable")[:, :TOP_K]
    relevant = [{ids[j] for j in row} for row in exact]
    store = CollectionStore(data / "synthetic", VectorClient(dim), snapshot_delta=NEVER)
    out = []
    try:
        configs = [("flat", {"index": "flat"}, None)]
        configs += [(f"binary x{m}", {"index": "binary", "rescore_multiplier": m}, m) for m in multipliers]
        for i, (label, options, multiplier) in enumerate(configs):
            sizes = collection(store, f"c{i}", options, ids, vecs)
            recall, p50 = recall_at_10(store, f"c{i}", qvecs, relevant)
            out.append([f"synthetic {n}x{dim}", *memory_rows(label, sizes, dim, multiplier, n), f"{recall:.3f}",
                        f"{p50:.2f}"])
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=200_000, help="synthetic passages (one per document)")
    ap.add_argument("--dim", type=int, default=384, help="synthetic dimensions (a multiple of 8)")
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries")
    ap.add_argument("--multipliers", default=f"1,{RESCORE_MULTIPLIER},10",
                    help="rescore_multiplier values of the binary collections, comma-separated")
    ap.add_argument("--no-labelled", action="store_true", help="skip the labelled set (and the model)")
    args = ap.parse_args()
    if args.dim % 8:
        ap.error("--dim must be a multiple of 8")
    configure_logging(Settings(log_level="WARNING"), component="bench")
    multipliers = [int(m) for m in args.multipliers.split(",") if m]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-binary-") as tmp:
        if not args.no_labelled:
            rows += labelled_bench(Path(tmp))
        rows += synthetic_bench(Path(tmp), args.passages, args.dim, args.queries, multipliers)
    print(table(rows, ["data", "index", "index MiB (in RAM)", "bits/dim", "float file MiB (on disk)",
                       "float KiB read/query", "recall@10", "search p50 ms"]))


if __name__ == "__main__":
    main()
