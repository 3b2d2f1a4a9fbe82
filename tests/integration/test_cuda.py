"""The sidecar on a CUDA device: pinned staging buffers, the spin policy the
free CPU allows, vectors equal to SentenceTransformer.encode on the CPU, and
half precision within its documented tolerance. Skipped where torch sees no
CUDA device (every CPU-only machine); run on a GPU host with the same command."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shm_protocol.layout import WaitPolicy
from tests.helpers import client_for, cosine_rows, start_sidecar, stop_and_check
from tests.integration.test_accuracy import VARIED, mixed_batch

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device on this machine")]


@pytest.fixture(scope="module")
def cuda_sidecar(tmp_path_factory):
    sc = start_sidecar(tmp_path_factory.mktemp("sc-cuda"), None, SHM_EMBED_DEVICE="cuda")
    yield sc
    stop_and_check(sc)


def test_cuda_vectors_equal_the_cpu_reference(cuda_sidecar, real_model):
    texts = VARIED + mixed_batch(1000)
    with client_for(cuda_sidecar) as c:
        got = c.embed(texts)
        info = c.info()
    assert info["device"].startswith("cuda")
    ref = real_model.encode(texts, batch_size=64)
    cos = cosine_rows(got, ref)
    assert cos.min() >= 0.99999, float(cos.min())


def test_cuda_uses_the_spin_policy_under_auto(cuda_sidecar):
    with client_for(cuda_sidecar) as c:
        region = c._get_session().region
        assert WaitPolicy(int(region.hv.wait_policy[0])) is WaitPolicy.SPIN


def test_cuda_staging_buffers_are_pinned_and_reused(real_model_path, real_model):
    from shm_protocol.config import Settings
    from sidecar.model import Embedder

    emb = Embedder(Settings.from_env({"SHM_EMBED_MODEL": str(real_model_path), "SHM_EMBED_DEVICE": "cuda"}))
    assert emb.is_cuda and not emb.uses_cpu
    assert emb._ids_host.is_pinned() and emb._mask_host.is_pinned() and emb._out_host.is_pinned()
    tok = real_model.tokenizer
    texts = ["pinned memory", "a second, somewhat longer text about staging buffers"]
    seqs = [np.asarray(x, np.int64) for x in tok(texts)["input_ids"]]
    first = emb.embed(seqs).copy()
    ptr = emb._out_host.data_ptr()
    again = emb.embed(seqs)
    assert emb._out_host.data_ptr() == ptr  # no new host buffer per call
    assert cosine_rows(first, real_model.encode(texts)).min() >= 0.99999
    assert np.array_equal(first, again)


def test_cuda_concurrent_clients_each_get_their_own_vectors(cuda_sidecar, real_model):
    texts = mixed_batch(240, seed=11)
    ref = real_model.encode(texts, batch_size=64)
    wrong: list[int] = []

    def worker(k: int) -> None:
        with client_for(cuda_sidecar) as c:
            for i in range(k, len(texts), 8):
                v = c.embed([texts[i]])[0]
                if float(np.dot(v, ref[i]) / np.linalg.norm(ref[i])) < 0.99999:
                    wrong.append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not wrong


def test_cuda_float16_stays_close(tmp_path, real_model):
    sc = start_sidecar(tmp_path, None, SHM_EMBED_DEVICE="cuda", SHM_EMBED_DTYPE="float16")
    try:
        texts = VARIED + mixed_batch(200, seed=5)
        with client_for(sc) as c:
            got = c.embed(texts)
        cos = cosine_rows(got, real_model.encode(texts, batch_size=64))
        assert cos.min() >= 0.999, float(cos.min())
    finally:
        stop_and_check(sc)


def test_cuda_sidecar_captures_its_calls_as_graphs(cuda_sidecar):
    log = cuda_sidecar.log.read_text()
    assert "CUDA graphs" in log and "runs eagerly" not in log, log[-3000:]


@pytest.fixture(scope="module")
def fp16_pair(real_model_path):
    """The bundled model on CUDA in float16, eager and with its calls captured."""
    from shm_protocol.config import Settings
    from sidecar.cuda_graphs import GraphedEmbedder
    from sidecar.model import Embedder

    inner = Embedder(Settings.from_env({"SHM_EMBED_MODEL": str(real_model_path), "SHM_EMBED_DEVICE": "cuda",
                                        "SHM_EMBED_DTYPE": "float16", "SHM_EMBED_CALL_ROWS": "64"}))
    return inner, GraphedEmbedder(inner)


def test_cuda_graph_replays_give_the_eager_vectors(fp16_pair, real_model):
    inner, graphed = fp16_pair
    assert graphed.graphed and inner.info.dtype == "float16"
    texts = VARIED + mixed_batch(200, seed=7)
    ids = real_model.tokenizer(texts, truncation=True, max_length=inner.info.max_seq_length)["input_ids"]
    seqs = [np.asarray(x, np.int32) for x in ids]
    worst = 1.0
    start = 0
    for rows in (1, 2, 3, 8, 13, 32, 64, 1, 5):
        batch = seqs[start: start + rows]
        start += rows
        got = graphed.embed(batch).copy()
        want = inner.embed(batch).copy()
        worst = min(worst, float(cosine_rows(got, want).min()))
    assert graphed.replays >= 8
    assert worst >= 0.999, worst


def test_cuda_graph_batch_of_one_timing(fp16_pair, real_model):
    """Not a limit (timing varies by host): prints a lone text's call time
    eager and replayed, and checks the replay is not slower by much."""
    import time

    inner, graphed = fp16_pair
    seq = [np.asarray(real_model.tokenizer(["a lone query about shared memory"])["input_ids"][0], np.int32)]

    def median_us(backend) -> float:
        for _ in range(20):
            backend.embed(seq)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            backend.embed(seq)
            times.append(time.perf_counter() - t0)
        return 1e6 * float(np.median(times))

    eager, replay = median_us(inner), median_us(graphed)
    print(f"\nbatch of 1 ({len(seq[0])} tokens), float16: eager {eager:.0f} us, CUDA graph {replay:.0f} us")
    assert replay <= 1.5 * eager, (eager, replay)
