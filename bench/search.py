"""Collections: search latency at 10k and 1M stored passages, and documents
ingested per second through the sidecar.

    python bench/search.py                   # 10k and 1M passages, then ingest
    python bench/search.py --sizes 10000     # quicker
    python bench/search.py --store-url postgresql://user:pw@host/db   # the same against PostgreSQL

The store is SQLite (a temporary data directory) unless --store-url names a
PostgreSQL database: then every collection of the run is made there under a
name of its own (``bench-<run>-...``) and deleted at the end. Writes then
cross the network once per batch (COPY), searches a few times per query.

Search: synthetic unit vectors in clusters (384 dimensions, the bundled
model's), four passages per document, written with the store's own write
path into a fresh collection (index "auto": exact below
SHM_EMBED_IVF_MIN_VECTORS, IVF above). Each query is a stored passage plus
noise, like a question near a few passages. Reported per size: the store's
search (FAISS plus the SQLite reads of passages and documents, without the
query's embedding), the same FAISS index alone, an exact flat index alone,
recall@10 of the store's answer against the exact one, and the one-off costs
(writing, a worker's first load). The query's own embedding through the
sidecar is measured on its own. Ingest: real documents of 30 to 300 words
through ``CollectionStore.upsert`` (split, embedded by the sidecar, written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import passages, pct, running_sidecar, short_queries, table  # noqa: E402

from retrieval.database import redact  # noqa: E402
from retrieval.faiss_index import PassageIndex  # noqa: E402
from retrieval.store import CollectionStore, Document  # noqa: E402
from shm_protocol.client import EmbeddingClient  # noqa: E402

PER_DOC = 4


class Stores:
    """Where the run's collections go: a SQLite data directory per use, or one
    PostgreSQL database (``url``) with a collection name per use."""

    def __init__(self, data: Path, url: str | None):
        self.data, self.url = data, url
        self.run = uuid.uuid4().hex[:6]
        self.made: list[tuple[str, str]] = []  # (location, collection) to delete at the end

    def open(self, use: str, client) -> tuple[CollectionStore, str]:
        """A store for ``use`` and the name of its collection there."""
        if self.url is None:
            return CollectionStore(self.data / use, client), "bench"
        name = f"bench-{self.run}-{use}"
        self.made.append((self.url, name))
        return CollectionStore(self.url, client), name

    def reopen(self, use: str, client) -> CollectionStore:
        """Another store over the same data: a worker that has loaded nothing yet."""
        return CollectionStore(self.url or self.data / use, client)

    def cleanup(self, client) -> None:
        for location, name in self.made:
            store = CollectionStore(location, client)
            try:
                store.delete(name)
            except Exception as exc:  # a run that failed before it made the collection
                print(f"could not delete {name}: {exc}", file=sys.stderr)
            store.close()


def clustered(n: int, dim: int, rng, clusters: int = 2000) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        out[a:b] = centres[rng.integers(0, clusters, b - a)] + 0.6 * rng.standard_normal((b - a, dim)).astype(
            np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def fill(store: CollectionStore, name: str, vecs: np.ndarray) -> float:
    """Write ``vecs`` as documents of PER_DOC passages; returns seconds."""
    text = " ".join(f"w{j}" for j in range(8 * PER_DOC))
    spans = [(m.start(), m.end()) for m in __import__("re").finditer(r"(?:\S+\s*){8}", text)][:PER_DOC]
    spans = [(a, b - (1 if text[b - 1:b] == " " else 0)) for a, b in spans]
    t0 = time.perf_counter()
    batch = 20_000
    for a in range(0, len(vecs), batch):
        b = min(len(vecs), a + batch)
        docs = [Document(f"d{i // PER_DOC}", text, None, {"shard": (i // PER_DOC) % 10}, spans)
                for i in range(a, b, PER_DOC)]
        store.write_embedded(name, docs, vecs[a:b])
    return time.perf_counter() - t0


def timed(fn, reps: int) -> list[float]:
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def search_bench(client, size: int, dim: int, reps: int, stores: Stores) -> list:
    rng = np.random.default_rng(size)
    vecs = clustered(size, dim, rng)
    store, name = stores.open(f"s{size}", client)
    store.create(name, {"passage_words": 8, "overlap_words": 0})
    write_s = fill(store, name, vecs)
    reader = stores.reopen(f"s{size}", client)  # a worker that has loaded nothing yet
    q0 = vecs[0] + 0.05 * rng.standard_normal(dim).astype(np.float32)
    t0 = time.perf_counter()
    reader.search_vector(name, q0 / np.linalg.norm(q0), 10)
    load_s = time.perf_counter() - t0
    picks = rng.integers(0, size, reps)
    queries = vecs[picks] + 0.3 * rng.standard_normal((reps, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    store_ms = timed(lambda i: reader.search_vector(name, queries[i], 10), reps)
    index = reader._loaded[name].index
    faiss_ms = timed(lambda i: index.search(queries[i], 40), reps)
    flat = PassageIndex(dim)
    flat.add(np.arange(size, dtype=np.int64), vecs)
    flat_ms = timed(lambda i: flat.search(queries[i], 40), reps)
    recall = []
    for i in range(min(reps, 100)):
        got = {r["id"] for r in reader.search_vector(name, queries[i], 10)}
        exact = (vecs @ queries[i]).reshape(-1, PER_DOC).max(axis=1)  # best passage per document
        want = {f"d{j}" for j in np.argsort(-exact)[:10]}
        recall.append(len(got & want) / 10)
    sweep = []
    if index.kind == "ivf":  # what SHM_EMBED_SEARCH_NPROBE trades
        for nprobe in (8, 16, 32, 64, 128):
            index.nprobe = nprobe
            ms = timed(lambda i: reader.search_vector(name, queries[i], 10), min(reps, 100))
            rec = []
            for i in range(min(reps, 100)):
                got = {r["id"] for r in reader.search_vector(name, queries[i], 10)}
                exact = (vecs @ queries[i]).reshape(-1, PER_DOC).max(axis=1)
                rec.append(len(got & {f"d{j}" for j in np.argsort(-exact)[:10]}) / 10)
            sweep.append([f"{size:,}", nprobe, f"{pct(ms, 50):.2f} / {pct(ms, 99):.2f}", f"{np.mean(rec):.3f}"])
        index.nprobe = reader.nprobe
    info = reader.info(name)
    kind = f"{info['index']['kind']}" + (f" nlist={info['index']['nlist']} nprobe={info['index']['nprobe']}"
                                        if info["index"]["kind"] == "ivf" else "")
    reader.close()
    store.close()
    return sweep, [f"{size:,}", kind, f"{pct(store_ms, 50):.2f} / {pct(store_ms, 99):.2f}",
            f"{pct(faiss_ms, 50):.2f} / {pct(faiss_ms, 99):.2f}", f"{pct(flat_ms, 50):.2f} / {pct(flat_ms, 99):.2f}",
            f"{np.mean(recall):.3f}", f"{write_s:.0f} s ({size / write_s:,.0f}/s)", f"{load_s:.1f} s"]


def ingest_bench(client, stores: Stores, ndocs: int) -> tuple[float, float, list[float]]:
    store, name = stores.open("ingest", client)
    store.create(name)
    texts = passages(ndocs, seed=5, lo=30, hi=300)
    t0 = time.perf_counter()
    n_pass = 0
    for a in range(0, ndocs, 16):
        n_pass += store.upsert(name, [{"id": str(i), "text": t} for i, t in enumerate(texts[a:a + 16], a)])[
            "passages"]
    secs = time.perf_counter() - t0
    qs = short_queries(60, seed=9)
    embed_ms = timed(lambda i: client.embed([qs[i]], normalize=True), len(qs))
    full_ms = timed(lambda i: store.search(name, qs[i], 10), len(qs))
    store.close()
    return ndocs / secs, n_pass / secs, embed_ms, full_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000", help="stored passages, comma-separated")
    ap.add_argument("--reps", type=int, default=300, help="queries per size")
    ap.add_argument("--ingest-docs", type=int, default=160)
    ap.add_argument("--store-url", default=None, metavar="postgresql://...",
                    help="keep the collections in this PostgreSQL database instead of a temporary SQLite file")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="shm-embed-bench-"))
    stores = Stores(data, args.store_url)
    print(f"Collection store: {redact(args.store_url) if args.store_url else 'SQLite, ' + str(data)}")
    try:
        with running_sidecar() as (settings, _):
            client = EmbeddingClient.connect(settings)
            dim = client.dimension
            try:
                results = [search_bench(client, int(s), dim, args.reps, stores) for s in args.sizes.split(",")]
                ingest = ingest_bench(client, stores, args.ingest_docs)
            finally:
                stores.cleanup(client)
            rows = [r for _, r in results]
            sweeps = [row for sweep, _ in results for row in sweep]
            print("\nSearch, top 10 documents, milliseconds p50 / p99 (query embedding not included):")
            print(table(rows, ["passages", "index", "store search", "its FAISS alone", "exact flat alone",
                               "recall@10", "write", "first load"]))
            if sweeps:
                print("\nIVF: lists scanned per query (SHM_EMBED_SEARCH_NPROBE) against latency and recall@10:")
                print(table(sweeps, ["passages", "nprobe", "store search p50 / p99 ms", "recall@10"]))
            docs_s, pass_s, embed_ms, full_ms = ingest
            print(f"\nIngest through the sidecar: {docs_s:.1f} documents/s ({pass_s:.1f} passages/s), "
                  f"documents of 30-300 words in requests of 16")
            print(f"Query embedding through the sidecar: p50 {pct(embed_ms, 50):.1f} ms, "
                  f"p99 {pct(embed_ms, 99):.1f} ms;"
                  f" a whole search (embed + search, {args.ingest_docs} documents): p50 {pct(full_ms, 50):.1f} ms, "
                  f"p99 {pct(full_ms, 99):.1f} ms")
            client.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
