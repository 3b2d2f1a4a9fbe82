"""CUDA graphs: a model's small calls replayed instead of launched.

A small call on a GPU is launch-bound: all-MiniLM-L6-v2 is a few hundred
kernels, each launched from Python, for a few microseconds of work each.
:class:`GraphedEmbedder` wraps a loaded :class:`sidecar.model.Embedder` and,
at start-up, captures one ``torch.cuda.CUDAGraph`` per (rows, width) bucket
(:func:`graph_buckets`), each with static input and output tensors on the
device; a call then costs three copies and one replay.

A call of ``n`` texts whose longest has ``w`` tokens runs in the smallest
bucket (R, W) with R >= n and W >= w (:func:`pick_bucket`): its ids are
padded to W with attention mask 0, as the eager path pads to ``w``, and the
R - n rows beyond the real ones hold one token each (mask 1 at position 0
only: a row with no token to attend to makes some attention kernels write
NaN, harmless to the other rows but not worth having). Only the first ``n``
rows are read back. A call that fits no bucket, or that would more than
double its padded tokens to fit one (and is large enough for its kernels'
launches not to matter), runs eagerly.

A model that cannot be captured (a kernel that synchronizes, an operation a
graph may not hold) or whose replay does not give the eager vectors runs
eagerly, with a log line; the sidecar serves either way.

The capture itself is one "runner" per bucket: ``cuda_graph_runner`` on
CUDA, ``eager_runner`` elsewhere, so that buckets, padding, the copies in
and out and the fallback run and are tested on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from loguru import logger

from shm_protocol.layout import ModelKind

if TYPE_CHECKING:
    from .model import Embedder

#: Padded widths a graph is captured for (up to the model's max sequence
#: length, which is always one): 1.5x steps keep a call's padding under 50%.
GRAPH_WIDTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)

#: A call runs in a bucket only if the bucket's padded tokens are at most
#: this many times its own, or at most SMALL_CALL_TOKENS: past that, the
#: extra padding costs more than the launches a replay saves (a choice, not
#: a measurement: large calls are compute-bound on any GPU).
GRAPH_MAX_PAD = 2.0
SMALL_CALL_TOKENS = 4096

#: Eager runs before a capture (on a side stream, as torch asks): the first
#: run of a shape initialises workspaces that a capture may not allocate.
WARMUP_RUNS = 2

#: A captured model must give the eager vectors: at least this cosine on
#: every row of a ragged check batch (float16 on CUDA stays above 0.9999).
CHECK_MIN_COSINE = 0.999
#: And a reranker's or classifier's scores within this share of the largest score (or of 1).
CHECK_MAX_SCORE_DIFF = 0.02


def graph_buckets(max_rows: int, max_width: int, capacity_tokens: int) -> list[tuple[int, int]]:
    """Every (rows, width) bucket a model captures: rows in powers of two up
    to ``max_rows`` (and ``max_rows``), widths from GRAPH_WIDTHS up to
    ``max_width`` (and ``max_width``), within ``capacity_tokens`` padded."""
    rows = [1 << k for k in range(max_rows.bit_length()) if 1 << k <= max_rows]
    if rows[-1] != max_rows:
        rows.append(max_rows)
    widths = [w for w in GRAPH_WIDTHS if w < max_width] + [max_width]
    return [(r, w) for r in rows for w in widths if r * w <= capacity_tokens]


def pick_bucket(rows: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The bucket a call of ``rows`` texts padded to ``width`` runs in: the
    one with the fewest padded tokens that holds it, or None (run eagerly)
    when none holds it or when it would pad too much (GRAPH_MAX_PAD)."""
    best = None
    for r, w in buckets:
        if r >= rows and w >= width and (best is None or r * w < best[0] * best[1]):
            best = (r, w)
    if best is None:
        return None
    padded = best[0] * best[1]
    if padded > SMALL_CALL_TOKENS and padded > GRAPH_MAX_PAD * rows * width:
        return None
    return best


class StaticCall:
    """One bucket's static tensors on the device: ids, mask and segment ids
    (rows x width, int64), and ``out`` (rows x dim, float32) once its runner
    is built. Every replay reads and writes these same tensors."""

    def __init__(self, torch, rows: int, width: int, device, takes_types: bool):
        self.rows, self.width = rows, width
        self.ids = torch.zeros((rows, width), dtype=torch.int64, device=device)
        self.mask = torch.zeros((rows, width), dtype=torch.int64, device=device)
        self.types = torch.zeros((rows, width), dtype=torch.int64, device=device) if takes_types else None
        self.out = None
        self.run: Callable[[], None] | None = None

    def features(self) -> dict:
        features = {"input_ids": self.ids, "attention_mask": self.mask}
        if self.types is not None:
            features["token_type_ids"] = self.types
        return features


def eager_runner(torch, forward: Callable, call: StaticCall) -> Callable[[], None]:
    """A runner that runs ``forward`` on the static inputs and copies the
    result into the static output: the graph's contract without a graph
    (CPU, tests)."""
    with torch.inference_mode():
        call.out = forward(call.features()).clone()

    def run() -> None:
        call.out.copy_(forward(call.features()))

    return run


def cuda_graph_runner(torch, forward: Callable, call: StaticCall, pool=None) -> Callable[[], None]:
    """Capture ``forward`` on the static inputs into a CUDA graph (after
    WARMUP_RUNS eager runs on a side stream) and return its replay; the
    output tensor the capture made is the static output."""
    side = torch.cuda.Stream(device=call.ids.device)
    side.wait_stream(torch.cuda.current_stream(call.ids.device))
    with torch.inference_mode(), torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            forward(call.features())
    torch.cuda.current_stream(call.ids.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
        call.out = forward(call.features())
    return graph.replay


class GraphedEmbedder:
    """A :class:`sidecar.backend.Backend` that serves ``inner``'s calls from
    captured buckets where one fits, else from ``inner`` itself.

    ``make_runner(torch, forward, call)`` builds one bucket's runner:
    ``cuda_graph_runner`` (sharing one memory pool across the buckets) on
    CUDA, ``eager_runner`` elsewhere unless given.
    """

    def __init__(self, inner: Embedder, *, make_runner: Callable | None = None,
                 buckets: list[tuple[int, int]] | None = None):
        self.inner = inner
        self.info = inner.info
        self.uses_cpu = inner.uses_cpu
        self.torch = torch = inner.torch
        self.is_cuda = inner.is_cuda
        self._calls: dict[tuple[int, int], StaticCall] = {}
        self.buckets: list[tuple[int, int]] = []
        #: Calls served by a replay, and by the eager model (for tests and logs).
        self.replays = 0
        self.eager_calls = 0
        if make_runner is None:
            if self.is_cuda:
                pool = torch.cuda.graph_pool_handle()  # one pool: buckets never run at once

                def make_runner(torch_, forward, call):
                    return cuda_graph_runner(torch_, forward, call, pool)
            else:
                make_runner = eager_runner
        cap = inner.capacity_tokens
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device=inner.device)
            pin = {"pin_memory": True}
        else:
            pin = {}
        # Host staging (pinned on CUDA): the padded inputs of one call, and its output.
        self._ids_host = torch.zeros(cap, dtype=torch.int64, **pin)
        self._mask_host = torch.zeros(cap, dtype=torch.int64, **pin)
        self._types_host = torch.zeros(cap, dtype=torch.int64, **pin)
        self._out_host = torch.zeros((inner.max_texts, self.info.dim), dtype=torch.float32, **pin)
        self._ids_np, self._mask_np = self._ids_host.numpy(), self._mask_host.numpy()
        self._types_np, self._out_np = self._types_host.numpy(), self._out_host.numpy()
        t0 = time.monotonic()
        wanted = graph_buckets(inner.max_texts, self.info.max_seq_length, cap) if buckets is None else buckets
        try:
            self._attention = self._use_fused_attention()
            calls = {}
            for rows, width in wanted:
                call = StaticCall(torch, rows, width, inner.device, inner.takes_types)
                call.run = make_runner(torch, inner.forward, call)
                calls[(rows, width)] = call
            self._calls, self.buckets = calls, list(wanted)
            self._check()
        except Exception as exc:  # any model the capture cannot hold still serves, eagerly
            self._calls, self.buckets = {}, []
            if self.is_cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            logger.warning("{}: could not capture its calls ({!r}); it runs eagerly", self.info.name, exc)
            return
        logger.info("{}: captured {} {} (rows x width, up to {} x {}) in {:.1f}s, {} attention",
                    self.info.name, len(self.buckets), "CUDA graphs" if self.is_cuda else "static calls",
                    max(r for r, _ in self.buckets), max(w for _, w in self.buckets), time.monotonic() - t0,
                    self._attention)

    # -- Backend --------------------------------------------------------------------------
    @property
    def call_rows(self) -> int:
        return self.inner.call_rows

    @property
    def capacity_tokens(self) -> int:
        return self.inner.capacity_tokens

    @property
    def graphed(self) -> bool:
        """Whether any bucket was captured (False: every call runs eagerly)."""
        return bool(self._calls)

    def embed(self, seqs: list[np.ndarray], segments: list[int] | None = None) -> np.ndarray:
        """As :meth:`sidecar.model.Embedder.embed`: through the smallest
        bucket that holds the call, else the eager model."""
        n = len(seqs)
        width = max(len(s) for s in seqs)
        bucket = pick_bucket(n, width, self.buckets) if self._calls else None
        if bucket is None:
            self.eager_calls += 1
            return self.inner.embed(seqs, segments)
        self.replays += 1
        return self._replay(self._calls[bucket], seqs, segments)

    # -- inside -------------------------------------------------------------------------
    def _replay(self, call: StaticCall, seqs: list[np.ndarray], segments: list[int] | None) -> np.ndarray:
        torch = self.torch
        n_texts, rows, width = len(seqs), call.rows, call.width
        size = rows * width
        ids = self._ids_np[:size].reshape(rows, width)
        mask = self._mask_np[:size].reshape(rows, width)
        ids.fill(0)
        mask.fill(0)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        mask[n_texts:, 0] = 1  # a padding row attends to its one token (see the module's docstring)
        if call.types is not None:
            types = self._types_np[:size].reshape(rows, width)
            types.fill(0)
            if segments is not None and self.info.type_vocab_size > 1:
                for i, (seq, split) in enumerate(zip(seqs, segments)):
                    if split:
                        types[i, split: len(seq)] = 1
        with torch.inference_mode():
            if self.is_cuda:
                with torch.cuda.stream(self.stream):
                    call.ids.copy_(self._ids_host[:size].view(rows, width), non_blocking=True)
                    call.mask.copy_(self._mask_host[:size].view(rows, width), non_blocking=True)
                    if call.types is not None:
                        call.types.copy_(self._types_host[:size].view(rows, width), non_blocking=True)
                    call.run()
                    self._out_host[:n_texts].copy_(call.out[:n_texts], non_blocking=True)
                self.stream.synchronize()
                return self._out_np[:n_texts]
            call.ids.copy_(self._ids_host[:size].view(rows, width))
            call.mask.copy_(self._mask_host[:size].view(rows, width))
            if call.types is not None:
                call.types.copy_(self._types_host[:size].view(rows, width))
            call.run()
            return call.out[:n_texts].numpy()

    def _use_fused_attention(self) -> str:
        """Ask the transformers model for torch's fused attention (sdpa);
        the kernel it runs with, for the log."""
        config = getattr(self.inner.hf_model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current != "sdpa" and hasattr(self.inner.hf_model, "set_attn_implementation"):
            try:
                self.inner.hf_model.set_attn_implementation("sdpa")
            except Exception as exc:  # an architecture without it keeps its own
                logger.info("{}: keeps {} attention ({!r})", self.info.name, current, exc)
            current = getattr(config, "_attn_implementation", current)
        return str(current)

    def _check(self) -> None:
        """The captured calls must give the eager model's vectors: a ragged
        batch (lengths 1 to the bucket's width) through the largest and the
        smallest bucket of the smallest width, against the eager model."""
        vocab = self.info.vocab_size
        small = min(self.buckets)
        large = max((b for b in self.buckets if b[1] == small[1]), key=lambda b: b[0])
        for rows, width in {small, large}:
            n = max(1, rows - 1) if rows > 1 else 1  # one padding row where the bucket has room for one
            seqs = [(np.arange(1000 + 7 * i, 1000 + 7 * i + 1 + (i * 5) % width) % vocab).astype(np.int64)
                    for i in range(n)]
            got = self._replay(self._calls[(rows, width)], seqs, None).copy()
            want = np.asarray(self.inner.embed(seqs), np.float32)
            if not np.isfinite(got).all():
                raise RuntimeError(f"bucket {rows}x{width} gives values that are not finite")
            if self.info.kind != ModelKind.EMBED:  # scores (a reranker's, a classifier's logits): close in value
                diff = float(np.abs(got - want).max())
                if diff > CHECK_MAX_SCORE_DIFF * max(1.0, float(np.abs(want).max())):
                    raise RuntimeError(f"bucket {rows}x{width} gives other scores than the eager model "
                                       f"(max difference {diff:.4f})")
                continue
            cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
            if float(cos.min()) < CHECK_MIN_COSINE:
                raise RuntimeError(f"bucket {rows}x{width} gives other vectors than the eager model "
                                   f"(min cosine {float(cos.min()):.6f})")
