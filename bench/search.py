"""Collections: search latency at 10k and 1M stored passages, and documents
ingested per second through the sidecar.

    python bench/search.py                   # 10k and 1M passages, then ingest
    python bench/search.py --sizes 10000     # quicker
    python bench/search.py --store-url postgresql://user:pw@host/db   # the same against PostgreSQL
    python bench/search.py --workers 4 --passages 1000000   # one host: snapshot against per-worker indexes
    python bench/search.py --workers 4 --passages 20000     # the same, small: a check that it runs

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
(writing, a worker's first load), each worker holding its own index
(``SHM_EMBED_SNAPSHOTS=false``). The query's own embedding through the
sidecar is measured on its own. Ingest: real documents of 30 to 300 words
through ``CollectionStore.upsert`` (split, embedded by the sidecar, written).

One host (``--workers N``, no sidecar: the same synthetic vectors, written
straight into the store, queries given as vectors): N worker processes search
one collection, first each with its own index (``SHM_EMBED_SNAPSHOTS=false``,
as before snapshots), then all on one shared snapshot, side by side in one
run. Reported per mode: the workers' total PSS (from
/proc/<pid>/smaps_rollup, after a search that scans every list, so every page
of the snapshot is counted) against one copy of the vectors (passages x
dimensions x 4 bytes), search p50 / p99 (each worker in turn, the others
idle), recall@10 against exact search, a worker's first load. Then, per mode,
a writer adds ``--write-passages`` passages in batches of 2,000 while each
worker searches once after every batch (so it replays them): passages written
per second, and the workers' PSS after. The store is the one the settings
name (the environment's SHM_EMBED_* variables) or --store-url, with the
host's data (the SQLite file, the snapshots) under a fresh temporary
directory; the URL reaches the workers through their environment.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, passages, pct, pss_mb, running_sidecar, short_queries, table  # noqa: E402

from retrieval.collections.database import redact  # noqa: E402
from retrieval.collections.store import CollectionStore, Document  # noqa: E402
from retrieval.faiss_index import PassageIndex  # noqa: E402
from shm_protocol.client import EmbeddingClient  # noqa: E402
from shm_protocol.config import Settings  # noqa: E402
from shm_protocol.logs import configure_logging  # noqa: E402

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
            return CollectionStore(self.data / use, client, snapshots=False), "bench"
        name = f"bench-{self.run}-{use}"
        self.made.append((self.url, name))
        return CollectionStore(self.url, client), name

    def reopen(self, use: str, client) -> CollectionStore:
        """Another store over the same data: a worker that has loaded nothing yet."""
        return CollectionStore(self.url or self.data / use, client, snapshots=False)

    def cleanup(self, client) -> None:
        for location, name in self.made:
            store = CollectionStore(location, client, snapshots=False)
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


def fill(store: CollectionStore, name: str, vecs: np.ndarray, start: int = 0, batch: int = 20_000,
         between=None) -> float:
    """Write ``vecs`` as documents of PER_DOC passages (the first one's number
    ``start // PER_DOC``); returns the seconds the writes took (not ``between``,
    called after each batch)."""
    text = " ".join(f"w{j}" for j in range(8 * PER_DOC))
    spans = [(m.start(), m.end()) for m in __import__("re").finditer(r"(?:\S+\s*){8}", text)][:PER_DOC]
    spans = [(a, b - (1 if text[b - 1:b] == " " else 0)) for a, b in spans]
    spent = 0.0
    for begin in range(0, len(vecs), batch):
        end = min(len(vecs), begin + batch)
        t0 = time.perf_counter()
        docs = [Document(f"d{i // PER_DOC}", text, None, {"shard": (i // PER_DOC) % 10}, spans)
                for i in range(start + begin, start + end, PER_DOC)]
        store.write_embedded(name, docs, vecs[begin:end])
        spent += time.perf_counter() - t0
        if between is not None:
            between()
    return spent


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


# --- one host: N workers, a snapshot against per-worker indexes ----------------------------------

#: The collection's name, unless --store-url names a database shared with others (bench-<run>-host).
NAME = "bench"
#: Passages per batch of the write phase.
WRITE_BATCH = 2000
#: Passages of the write phase unless --write-passages says (at most half the collection).
WRITE_DEFAULT = 50_000


class VectorClient:
    """The store's client when vectors are given: it only names a model."""

    def __init__(self, dim: int):
        self.dimension = dim

    def info(self) -> dict:
        return {"model": "bench-synthetic-vectors", "dimension": self.dimension}


def open_store(data: Path, dim: int, snapshots: bool) -> CollectionStore:
    """The store the settings name, its data under ``data``."""
    settings = Settings.from_env().replace(data_dir=str(data), snapshots=snapshots)
    return CollectionStore.from_settings(settings, VectorClient(dim))


def worker_main(config: dict) -> None:
    """A worker process: one JSON command per line on stdin, one JSON answer per line on stdout."""
    configure_logging(Settings.from_env(), component="bench-worker")
    store = open_store(Path(config["data"]), config["dim"], config["snapshots"])
    name = config["name"]
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        t0 = time.perf_counter()
        if op == "warm":
            out = {"passages": store.warm(), "seconds": time.perf_counter() - t0}
        elif op == "touch":  # one search over every list: every page of the index is read once
            index = store._loaded[name].index
            index.nprobe = max(index.nlist, 1)
            store.search_vector(name, np.asarray(cmd["vector"], np.float32), 10)
            index.nprobe = store.nprobe
            out = {}
        elif op == "queries":
            queries = np.load(cmd["path"])
            ms, ids = [], []
            for q in queries:
                t0 = time.perf_counter()
                res = store.search_vector(name, q, 10)
                ms.append((time.perf_counter() - t0) * 1e3)
                ids.append([r["id"] for r in res])
            out = {"ms": ms, "ids": ids}
        else:  # "one": a single search, for a replay
            res = store.search_vector(name, np.asarray(cmd["vector"], np.float32), cmd.get("top_k", 10))
            out = {"ids": [r["id"] for r in res]}
        print(json.dumps(out), flush=True)
    store.close()


class Worker:
    def __init__(self, data: Path, dim: int, snapshots: bool, name: str):
        # No store URL here: it reaches the worker through SHM_EMBED_COLLECTIONS_URL in its environment.
        config = json.dumps({"data": str(data), "dim": dim, "snapshots": snapshots, "name": name})
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", config], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, op: str, timeout: float = 3600, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"worker {self.proc.pid}: no answer to {op} in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def exact_top10(vecs: np.ndarray, queries: np.ndarray) -> list[set[str]]:
    """The 10 documents with the best passage for each query, by exhaustive search."""
    best = np.full((len(queries), len(vecs) // PER_DOC), -np.inf, np.float32)
    for a in range(0, len(vecs), 100_000):
        b = min(len(vecs), a + 100_000)
        scores = (vecs[a:b] @ queries.T).reshape((b - a) // PER_DOC, PER_DOC, len(queries)).max(axis=1)
        best[:, a // PER_DOC:b // PER_DOC] = scores.T
    top = np.argpartition(-best, 10, axis=1)[:, :10]
    return [{f"d{j}" for j in row} for row in top]


def start_workers(n: int, data: Path, dim: int, snapshots: bool, touch: np.ndarray,
                  name: str) -> tuple[list[Worker], float]:
    """N workers, warmed and with every page of their index read; (workers, the slowest first load in s)."""
    workers = [Worker(data, dim, snapshots, name) for _ in range(n)]
    load_s = max(w.ask("warm")["seconds"] for w in workers)
    for w in workers:
        w.ask("touch", vector=touch.tolist())
    return workers, load_s


def host_bench(args) -> None:
    n_passages, dim, nw = args.passages - args.passages % PER_DOC, 384, args.workers
    os.environ.setdefault("SHM_EMBED_LOG_LEVEL", "WARNING")  # the workers' too: they inherit it
    name = NAME
    if args.store_url:  # the workers' and builders' store too: they inherit the environment
        os.environ["SHM_EMBED_COLLECTIONS_URL"] = args.store_url
        name = f"bench-{uuid.uuid4().hex[:6]}-host"
    configure_logging(Settings.from_env(), component="bench")
    data = Path(tempfile.mkdtemp(prefix="shm-embed-bench-host-"))
    print(f"Collection store: {redact(args.store_url) if args.store_url else 'SQLite, ' + str(data)}")
    copy_mb = n_passages * dim * 4 / 2**20
    writer = None
    try:
        rng = np.random.default_rng(n_passages)
        vecs = clustered(n_passages, dim, rng)
        writer = open_store(data, dim, snapshots=False)  # the bulk write trains the quantizer as before
        writer.create(name, {"passage_words": 8, "overlap_words": 0})
        fill_s = fill(writer, name, vecs)
        print(f"{n_passages:,} passages of {dim} dimensions written in {fill_s:.0f} s ({n_passages / fill_s:,.0f}/s); "
              f"one copy of the vectors: {copy_mb:,.0f} MiB")
        builder = open_store(data, dim, snapshots=True)
        with builder.db.read() as conn:
            cid = builder._row(conn, name).cid
        t0 = time.perf_counter()
        meta = builder.snapshots.build(cid)
        build_s = time.perf_counter() - t0
        print(f"snapshot built in {build_s:.0f} s: {meta['kind']}, {meta['nlist']} lists, {meta['ntotal']:,} passages")
        picks = rng.integers(0, n_passages, args.reps)
        queries = vecs[picks] + 0.3 * rng.standard_normal((args.reps, dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        qpath = data / "queries.npy"
        np.save(qpath, queries)
        exact = exact_top10(vecs, queries[:100])
        rows, write_rows = [], []
        for snapshots in (False, True):
            mode = "one shared snapshot" if snapshots else "an index per worker"
            workers, load_s = start_workers(nw, data, dim, snapshots, queries[0], name)
            try:
                pss = [pss_mb(w.proc.pid) for w in workers]
                ms, recall = [], []
                for worker in workers:  # one at a time: the latency of a search, not of the CPU shared by N
                    out = worker.ask("queries", path=str(qpath))
                    ms += out["ms"]
                    recall += [len(set(ids) & want) / 10 for ids, want in zip(out["ids"], exact)]
                rows.append([mode, f"{sum(pss):,.0f}", f"{sum(pss) / copy_mb:.2f}x",
                             " / ".join(f"{p:,.0f}" for p in pss),
                             f"{pct(ms, 50):.2f} / {pct(ms, 99):.2f}", f"{np.mean(recall):.3f}", f"{load_s:.1f} s"])
            finally:
                for worker in workers:
                    worker.close()
        print(f"\n{nw} workers, {n_passages:,} passages, top 10 documents "
              "(milliseconds p50 / p99, each worker in turn):")
        print(table(rows, ["mode", "workers' PSS MiB", "/ one copy", "each", "search p50 / p99 ms", "recall@10",
                           "first load"]))
        start = n_passages
        count = min(WRITE_DEFAULT, n_passages // 2) if args.write_passages is None else args.write_passages
        for snapshots in (False, True):
            mode = "one shared snapshot" if snapshots else "an index per worker"
            if snapshots:  # the host would have folded the writes of the other mode into a snapshot by now
                builder.snapshots.build(cid)
            workers, _ = start_workers(nw, data, dim, snapshots, queries[0], name)
            try:
                extra = clustered(count - count % PER_DOC, dim, rng)

                def replay(workers=workers):
                    for worker in workers:
                        worker.ask("one", vector=queries[1].tolist())

                t0 = time.perf_counter()
                write_s = fill(writer, name, extra, start=start, batch=WRITE_BATCH, between=replay)
                wall_s = time.perf_counter() - t0
                found = workers[-1].ask("one", vector=extra[-1].tolist(), top_k=1)["ids"]
                assert found == [f"d{(start + len(extra) - 1) // PER_DOC}"], found  # the last write is visible
                pss = [pss_mb(w.proc.pid) for w in workers]
                write_rows.append([mode, f"{len(extra):,}", f"{len(extra) / write_s:,.0f}",
                                   f"{len(extra) / wall_s:,.0f}", f"{sum(pss):,.0f}"])
                start += len(extra)
            finally:
                for worker in workers:
                    worker.close()
        print(f"\nWrites with {nw} live workers (batches of {WRITE_BATCH:,} passages; each worker searches after "
              f"each batch):")
        print(table(write_rows, ["mode", "passages", "written/s (the writes alone)", "/s (with the workers' replay)",
                                 "workers' PSS MiB after"]))
        builder.close()
    finally:
        if writer is not None:
            if args.store_url:  # a database shared with others: leave it as it was
                try:
                    writer.delete(name)
                except Exception as exc:  # a run that failed before it made the collection
                    print(f"could not delete {name}: {exc}", file=sys.stderr)
            writer.close()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000", help="stored passages, comma-separated")
    ap.add_argument("--reps", type=int, default=300, help="queries per size")
    ap.add_argument("--ingest-docs", type=int, default=160)
    ap.add_argument("--store-url", default=None, metavar="postgresql://...",
                    help="keep the collections in this PostgreSQL database instead of a temporary SQLite file")
    ap.add_argument("--workers", type=int, default=0,
                    help="one host: N worker processes, shared snapshot against per-worker indexes")
    ap.add_argument("--passages", type=int, default=1_000_000, help="with --workers: stored passages")
    ap.add_argument("--write-passages", type=int,
                    help="with --workers: passages of the write phase (default: 50,000, at most half of --passages)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # a worker process of --workers
    args = ap.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.workers:
        return host_bench(args)
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
