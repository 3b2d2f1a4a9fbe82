"""Vectors through the real sidecar equal SentenceTransformer.encode on the
bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shm_protocol.processes import rss_mb
from tests.helpers import client_for, cosine_rows

VARIED = [
    "",
    "word",
    "Ünïcödé straße, café, naïve résumé",
    "東京は日本の首都です",
    "Привет, как дела?",
    "emoji only 🎉🚀🔥",
    "mixed ASCII and 😀 emoji with numbers 12345",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines",
    "a " * 600,  # longer than the max sequence length
    "The quick brown fox jumps over the lazy dog. " * 40,
]


def mixed_batch(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    vocab = ("shared memory ring buffer semaphore sidecar worker batch token vector search query "
             "embedding model latency throughput gunicorn falcon request response cache").split()
    out = []
    for i in range(n):
        k = rng.choice([0, 1, 3, 8, 20, 60, 150, 400])
        out.append(" ".join(rng.choice(vocab) for _ in range(k)) + (f" #{i}" if k else ""))
    return out


def test_varied_texts_match_sentence_transformers(real_sidecar, real_model):
    with client_for(real_sidecar) as c:
        got = c.embed(VARIED)
        info = c.info()
    ref = real_model.encode(VARIED)
    assert info["model"] == "all-MiniLM-L6-v2" and info["dimension"] == 384 and info["max_seq_length"] == 256
    cos = cosine_rows(got, ref)
    assert cos.min() >= 0.99999, dict(zip(VARIED, cos.round(6)))


@pytest.mark.slow  # 15-25 s on 2 cores
def test_batch_of_300_mixed_lengths_matches(real_sidecar, real_model):
    """300 texts of 0-400 words span a dozen slots and several model calls."""
    texts = mixed_batch(300)
    with client_for(real_sidecar) as c:
        got = c.embed(texts)
    ref = real_model.encode(texts, batch_size=64)
    cos = cosine_rows(got, ref)
    assert got.shape == (300, 384)
    assert cos.min() >= 0.99999, float(cos.min())
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # the model's own Normalize module


def test_official_openai_client_gets_the_same_vectors(real_sidecar, real_model, tmp_path):
    """The openai package, pointed at the service with base_url, both encodings."""
    from openai import OpenAI

    from tests.helpers import start_web

    web = start_web(tmp_path, real_sidecar.env, workers=2)
    try:
        client = OpenAI(base_url=web.base + "/v1", api_key="unused", max_retries=0)
        texts = VARIED[:6] + mixed_batch(20)
        ref = real_model.encode(texts)
        import base64

        # None: the client's default, which asks for base64 and decodes it itself.
        for fmt in (None, "float", "base64"):
            kw = {} if fmt is None else {"encoding_format": fmt}
            resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, **kw)
            if fmt == "base64":  # asked for explicitly, the client hands the string over as is
                got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in resp.data])
            else:
                got = np.array([d.embedding for d in resp.data], dtype=np.float32)
            assert got.shape == ref.shape
            assert cosine_rows(got, ref).min() >= 0.99999, fmt
            assert resp.usage.prompt_tokens > len(texts)
        one = client.embeddings.create(model="all-MiniLM-L6-v2", input="just one")
        assert cosine_rows([one.data[0].embedding], real_model.encode(["just one"]))[0] >= 0.99999
    finally:
        web.stop()


def test_sidecar_gives_back_the_memory_of_a_large_batch(real_sidecar):
    import time

    rng = random.Random(4)
    words = "shared memory ring buffer model worker vector search index latency".split()
    texts = [" ".join(rng.choice(words) for _ in range(150)) for _ in range(256)]
    pid = real_sidecar.proc.pid
    with client_for(real_sidecar) as c:
        c.embed(["warm"])
        time.sleep(0.5)
        before = rss_mb(pid)
        c.embed(texts)  # model calls of 64 texts x 200 tokens: hundreds of MB of activations
        time.sleep(0.5)  # idle: the loop trims the heap after 50 ms
        after = rss_mb(pid)
    assert after - before < 80, f"sidecar RSS {before:.0f} -> {after:.0f} MiB after a large batch"


def test_langchain_openai_embeddings_get_the_same_vectors(real_sidecar, real_model, tmp_path):
    """LangChain's OpenAIEmbeddings, as its users point it at the service:
    with check_embedding_ctx_length=False it sends strings (otherwise it
    sends tiktoken ids, which the service refuses with a 422 naming that
    setting)."""
    from langchain_openai import OpenAIEmbeddings

    from tests.helpers import start_web

    web = start_web(tmp_path, real_sidecar.env, workers=1)
    try:
        emb = OpenAIEmbeddings(model="all-MiniLM-L6-v2", base_url=web.base + "/v1", api_key="unused",
                               check_embedding_ctx_length=False, max_retries=0)
        texts = VARIED[:6] + mixed_batch(10, seed=3)
        got = np.array(emb.embed_documents(texts), dtype=np.float32)
        assert cosine_rows(got, real_model.encode(texts)).min() >= 0.99999
        one = np.array(emb.embed_query("a question about shared memory"), dtype=np.float32)
        assert cosine_rows([one], real_model.encode(["a question about shared memory"]))[0] >= 0.99999
    finally:
        web.stop()


def test_dtype_auto_is_what_this_cpu_runs_best_and_stays_close_to_float32(real_model, tmp_path):
    """SHM_EMBED_DTYPE=auto (the default): the dtype the detection picks for
    this CPU (bfloat16 where it has AMX), reported by the client, /metrics
    and the stats CLI; its vectors stay within cosine 0.999 of float32's on
    varied texts, and a retrieval ranks the same passages first."""
    import subprocess
    import sys

    from shm_protocol.stats import snapshot
    from sidecar.model import choose_dtype, cpu_flags
    from tests.helpers import start_sidecar, stop_and_check

    want = choose_dtype("auto", "cpu", cpu_flags())
    sc = start_sidecar(tmp_path, None, SHM_EMBED_DTYPE="auto")
    try:
        with client_for(sc) as client:
            info = client.info()
            assert info["dtype"] == (want if want != "measure" else info["dtype"]) and info["dtype"] in (
                "float32", "bfloat16")
            assert info["models"][0]["dtype"] == info["dtype"]
            texts = VARIED + mixed_batch(64, seed=11)
            got = client.embed(texts)
            snap = snapshot(client._get_session().region)
            assert snap.dtype == info["dtype"]
        cli = subprocess.run([sys.executable, "-m", "shm_protocol.stats_cli", "--json"], env=sc.env,
                             capture_output=True, text=True, timeout=60)
        assert f'"dtype": "{info["dtype"]}"' in cli.stdout, cli.stdout[-2000:]
    finally:
        stop_and_check(sc)
    ref = real_model.encode(texts)
    cos = cosine_rows(got, ref)
    assert cos.min() >= 0.999, float(cos.min())
    # The same nearest passage for each query, in both dtypes.
    assert ((got[:20] @ got[20:].T).argmax(1) == (ref[:20] @ ref[20:].T).argmax(1)).mean() >= 0.95
