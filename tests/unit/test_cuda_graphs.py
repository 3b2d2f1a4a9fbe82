"""The CUDA-graph backend's logic on a CPU (sidecar.cuda_graphs): buckets,
padding to a bucket, the copies in and out of static buffers, and the
fallback to eager calls, with the eager runner standing in for a captured
graph. tests/integration/test_cuda.py runs the real graphs on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.cuda_graphs import SMALL_CALL_TOKENS, GraphedEmbedder, graph_buckets, pick_bucket


def test_buckets_cover_powers_of_two_rows_and_stepped_widths_within_the_budget():
    buckets = graph_buckets(16, 256, 1024)
    assert (1, 16) in buckets and (16, 64) in buckets and (4, 256) in buckets
    assert (16, 96) not in buckets and (8, 256) not in buckets  # over 1024 padded tokens
    assert all(r * w <= 1024 for r, w in buckets)
    assert {w for _, w in graph_buckets(100, 200, 1 << 20)} == {16, 32, 48, 64, 96, 128, 192, 200}
    assert {r for r, _ in graph_buckets(100, 200, 1 << 20)} == {1, 2, 4, 8, 16, 32, 64, 100}


def test_a_call_takes_the_smallest_bucket_that_holds_it_unless_it_pads_too_much():
    buckets = graph_buckets(256, 512, 1 << 20)
    assert pick_bucket(1, 7, buckets) == (1, 16)
    assert pick_bucket(3, 33, buckets) == (4, 48)
    assert pick_bucket(256, 512, buckets) == (256, 512)
    assert pick_bucket(257, 10, buckets) is None and pick_bucket(1, 513, buckets) is None
    # 65 x 129 would run as 128 x 192 (2.9x the padded tokens): eager instead;
    # a small call pads however much it needs (its launches cost more).
    assert pick_bucket(65, 129, buckets) is None
    small = pick_bucket(3, 17, buckets)
    assert small == (4, 32) and small[0] * small[1] <= SMALL_CALL_TOKENS


@pytest.fixture(scope="module")
def tiny_embedder(tiny_model):
    from shm_protocol.config import Settings
    from sidecar.model import Embedder

    return Embedder(Settings.from_env({
        "SHM_EMBED_MODEL": str(tiny_model), "SHM_EMBED_DEVICE": "cpu", "SHM_EMBED_DTYPE": "float32",
        "SHM_EMBED_CALL_ROWS": "8", "SHM_EMBED_MAX_BATCH_TEXTS": "16", "SHM_EMBED_CALL_TOKENS": "1024",
    }))


def ragged(rng, rows: int, longest: int, vocab: int) -> list[np.ndarray]:
    lengths = [longest] + rng.integers(1, longest + 1, rows - 1).tolist()
    return [rng.integers(1000, vocab, n).astype(np.int32) for n in lengths]


def test_the_bucketed_path_gives_the_plain_model_s_vectors(tiny_embedder):
    # A few buckets of graph_buckets(16, 256, 1024): each costs a model run to build.
    buckets = [(1, 16), (2, 16), (4, 32), (4, 48), (8, 64), (16, 64), (2, 256)]
    assert set(buckets) <= set(graph_buckets(16, 256, 1024))
    graphed = GraphedEmbedder(tiny_embedder, buckets=buckets)
    assert graphed.graphed and graphed.buckets == buckets
    rng = np.random.default_rng(3)
    vocab = tiny_embedder.info.vocab_size
    for rows, longest in ((1, 1), (1, 9), (3, 17), (5, 40), (8, 64), (16, 60), (2, 256)):
        seqs = ragged(rng, rows, longest, vocab)
        got = graphed.embed(seqs).copy()
        want = tiny_embedder.embed(seqs)
        assert got.shape == want.shape == (rows, tiny_embedder.info.dim)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{rows} x {longest}")
    assert (graphed.replays, graphed.eager_calls) == (7, 0)
    # A call no bucket holds runs on the eager model, which enforces its limits.
    with pytest.raises(ValueError, match="over capacity"):
        graphed.embed(ragged(rng, 16, 100, vocab))
    assert graphed.eager_calls == 1
    seqs = ragged(rng, 3, 100, vocab)
    np.testing.assert_allclose(graphed.embed(seqs).copy(), tiny_embedder.embed(seqs), atol=1e-5, rtol=1e-5)
    assert graphed.eager_calls == 2


def test_pairs_get_their_segment_ids_in_a_bucket(cross_encoder_path):
    from shm_protocol.config import Settings
    from shm_protocol.layout import ModelKind
    from shm_protocol.model_files import ModelSpec
    from sidecar.model import Embedder

    settings = Settings.from_env({"SHM_EMBED_DEVICE": "cpu", "SHM_EMBED_DTYPE": "float32",
                                  "SHM_EMBED_CALL_ROWS": "4", "SHM_EMBED_MAX_BATCH_TEXTS": "4"})
    inner = Embedder(settings, ModelSpec("ce", cross_encoder_path, ModelKind.RERANK))
    graphed = GraphedEmbedder(inner, buckets=[(1, 16), (4, 32)])
    rng = np.random.default_rng(5)
    seqs = ragged(rng, 3, 30, inner.info.vocab_size)
    splits = [5, 3, 0]
    got = graphed.embed(seqs, splits).copy()
    np.testing.assert_allclose(got, inner.embed(seqs, splits), atol=1e-5, rtol=1e-5)
    assert got.shape == (3, 1) and graphed.replays == 1
    # The segment ids of those pairs do not linger into a call without pairs.
    np.testing.assert_allclose(graphed.embed(seqs).copy(), inner.embed(seqs), atol=1e-5, rtol=1e-5)


class RaisesWhileCapturing:
    """A model whose forward raises, as one with a kernel that synchronizes
    does while a CUDA graph is being captured."""

    def __init__(self, model):
        self.model = model

    def __call__(self, features):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_model_that_cannot_be_captured_runs_eagerly_with_a_log_line(tiny_embedder):
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    real = tiny_embedder.model
    tiny_embedder.model = RaisesWhileCapturing(real)
    try:
        graphed = GraphedEmbedder(tiny_embedder, buckets=[(1, 16), (4, 32)])
    finally:
        tiny_embedder.model = real
        logger.remove(sink)
    assert not graphed.graphed and graphed.buckets == []
    assert any("could not capture" in line and "runs eagerly" in line for line in lines), lines
    seqs = ragged(np.random.default_rng(4), 4, 20, tiny_embedder.info.vocab_size)
    np.testing.assert_array_equal(graphed.embed(seqs).copy(), tiny_embedder.embed(seqs))
    assert (graphed.replays, graphed.eager_calls) == (0, 1)


def test_a_capture_that_gives_other_vectors_is_refused(tiny_embedder):
    """A graph that 'succeeds' but replays something else (here: a runner
    that never runs the model) must not serve."""
    from sidecar.cuda_graphs import eager_runner

    def wrong_runner(torch, forward, call):
        eager_runner(torch, forward, call)
        call.out.fill_(1.0)
        return lambda: None

    graphed = GraphedEmbedder(tiny_embedder, make_runner=wrong_runner, buckets=[(1, 16), (4, 32)])
    assert not graphed.graphed
