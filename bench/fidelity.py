"""What each dtype costs in fidelity, against float32.

    python bench/fidelity.py [--device cpu|cuda|auto] [--texts 300] [--passages 400] [--pairs 20]

For every dtype the device runs (float32, bfloat16; float16 on CUDA only):

1. Vectors: the minimum cosine, over varied texts (accents, CJK, emoji,
   empty, over-long, sentences of 1 to 400 words), between the bundled
   model's vectors in that dtype and in float32.
2. Retrieval: recall@10 on bench/data/labelled_retrieval.jsonl, 40 queries
   each with one passage written to answer it, among 400 passages (the
   other 360 are notices, invoices and stock counts generated from
   templates, about none of the queries' subjects). bfloat16's recall must
   equal float32's: the script exits 1 where it does not.
3. Reranking: a cross-encoder (the bundled MiniLM's weights with a fresh
   one-label head, as in bench/rerank.py: its scores mean nothing, their
   differences between dtypes are what is measured) scores each query
   against its top ``--pairs`` passages; the largest score difference from
   float32, the queries whose order of passages changes, and those whose
   first passage changes.

The models run through sentence-transformers (``encode``, ``predict``) with
their weights cast to each dtype, which is what the sidecar serves under
SHM_EMBED_DTYPE. Not a timing: any machine gives the same figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import REPO, table

DATA = REPO / "bench" / "data" / "labelled_retrieval.jsonl"


def varied_texts(n: int, seed: int = 11) -> list[str]:
    """Texts of every shape a service meets, ``n`` in all."""
    fixed = ["", "word", "Ünïcödé straße, café, naïve résumé", "東京は日本の首都です", "Привет, как дела?",
             "emoji only 🎉🚀🔥", "mixed ASCII and 😀 emoji with numbers 12345", "   leading and trailing   ",
             "tabs\tand\nnewlines", "a " * 600, "The quick brown fox jumps over the lazy dog. " * 40]
    rng = random.Random(seed)
    words = ("shared memory ring buffer semaphore sidecar worker batch token vector search query embedding "
             "model latency throughput river mountain bread recipe history election planet protein").split()
    out = list(fixed[:n])
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60, 150, 400])
        out.append(" ".join(rng.choice(words) for _ in range(k)) + f" #{len(out)}")
    return out


def load_labelled(path: Path, passages: int) -> tuple[list[dict], list[dict]]:
    """Queries and passages; with ``passages`` below the file's count, every
    relevant passage and the first others up to that many."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    queries = [r for r in rows if r["kind"] == "query"]
    docs = [r for r in rows if r["kind"] == "passage"]
    relevant = {pid for q in queries for pid in q["relevant"]}
    kept = [d for d in docs if d["id"] in relevant]
    kept += [d for d in docs if d["id"] not in relevant][: max(0, passages - len(kept))]
    return queries, kept


def recall_at(k: int, query_vecs: np.ndarray, doc_vecs: np.ndarray, queries: list[dict],
              docs: list[dict]) -> float:
    top = np.argsort(-(query_vecs @ doc_vecs.T), axis=1)[:, :k]
    ids = [d["id"] for d in docs]
    hits = sum(1 for q, row in zip(queries, top) if set(q["relevant"]) & {ids[i] for i in row})
    return hits / len(queries)


def dtypes_for(device: str) -> list[str]:
    return ["float32", "bfloat16", "float16"] if device.startswith("cuda") else ["float32", "bfloat16"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    ap.add_argument("--texts", type=int, default=300, help="varied texts for the minimum cosine")
    ap.add_argument("--passages", type=int, default=400, help="passages of the labelled set to search (<= 400)")
    ap.add_argument("--pairs", type=int, default=20, help="passages the cross-encoder scores per query")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from shm_protocol.model_files import bundled_model_path
    from sidecar.tiny import make_cross_encoder

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    texts = varied_texts(args.texts)
    queries, docs = load_labelled(DATA, args.passages)
    query_texts, doc_texts = [q["text"] for q in queries], [d["text"] for d in docs]

    model = SentenceTransformer(str(bundled_model_path()), device=device)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        reranker = CrossEncoder(str(make_cross_encoder(Path(tmp) / "ce")), device=device)
    rows, reference, ok = [], {}, True
    for dtype in dtypes_for(device):
        model.to(getattr(torch, dtype))
        reranker.to(getattr(torch, dtype))

        def encode(batch: list[str]) -> np.ndarray:
            return np.asarray(model.encode(batch, batch_size=args.batch_size, convert_to_numpy=True,
                                           normalize_embeddings=True), np.float32)

        vecs, qv, dv = encode(texts), encode(query_texts), encode(doc_texts)
        recall = recall_at(10, qv, dv, queries, docs)
        if dtype == "float32":
            # The pairs every dtype scores: each query's top passages by float32 vectors.
            top = np.argsort(-(qv @ dv.T), axis=1)[:, : args.pairs]
            pairs = [(query_texts[qi], doc_texts[di]) for qi, row in enumerate(top) for di in row]
        scores = np.asarray(reranker.predict(pairs, batch_size=args.batch_size, convert_to_numpy=True),
                            np.float64).reshape(len(queries), -1)
        if dtype == "float32":
            reference = {"vecs": vecs, "recall": recall, "scores": scores}
        ref = reference["vecs"]
        nonzero = (np.linalg.norm(vecs, axis=1) > 0) & (np.linalg.norm(ref, axis=1) > 0)
        cos = np.sum(vecs * ref, axis=1)[nonzero]
        order = np.argsort(-scores, axis=1, kind="stable")
        ref_order = np.argsort(-reference["scores"], axis=1, kind="stable")
        reordered = int((order != ref_order).any(axis=1).sum())
        first = int((order[:, 0] != ref_order[:, 0]).sum())
        diff = float(np.abs(scores - reference["scores"]).max())
        rows.append([dtype, f"{float(cos.min()):.6f}", f"{recall:.3f}", f"{diff:.4f}",
                     f"{reordered}/{len(queries)}", f"{first}/{len(queries)}"])
        if dtype == "bfloat16" and recall != reference["recall"]:
            ok = False
    print(f"device {device}; {len(texts)} varied texts; {len(queries)} queries over {len(docs)} passages; "
          f"cross-encoder scores of {args.pairs} passages per query; torch {torch.__version__}")
    print(table(rows, ["dtype", "min cosine vs float32", "recall@10", "rerank max |diff|",
                       "queries reordered", "top-1 changed"]))
    if not ok:
        print("bfloat16's recall@10 differs from float32's", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
