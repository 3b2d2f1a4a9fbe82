"""The synthetic backend: the sidecar's protocol without a model.

Each model call takes a set number of microseconds and leaves the CPU free
while it does (as a GPU model does), and returns deterministic unit vectors
computed from the token ids: the same ids always give the same vector,
different ids different ones. Header, limits and tokenizer are the model
folder's, so workers cannot tell it from a real model but by the vectors.
It serves protocol benchmarks, fast lifecycle tests and load tests of the
web tier on machines without a model or a GPU. Never imports torch.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from shm_protocol import model_files
from shm_protocol.config import Settings
from shm_protocol.layout import Activation, ModelKind

from .backend import ModelInfo

#: The last stretch of a synthetic call is spun rather than slept: a sleep
#: overshoots by 50-100 us on virtual machines, and the call should end on time.
SPIN_TAIL_NS = 200_000


#: Rows of the fixed random table synthetic vectors are mixed from.
_TABLE_ROWS = 1024
_tables: dict[int, np.ndarray] = {}


def _table(dim: int) -> np.ndarray:
    table = _tables.get(dim)
    if table is None:
        table = np.random.default_rng(20261125).standard_normal((_TABLE_ROWS, dim)).astype(np.float32)
        _tables[dim] = table
    return table


def synthetic_vector(ids: np.ndarray, dim: int) -> np.ndarray:
    """The unit vector the synthetic backend returns for one text's token ids:
    three rows of a fixed random table, picked by a hash of the ids and
    weighted 4:2:1 (about 10^9 distinct vectors; a few microseconds, so a
    synthetic call of 0 us costs next to nothing)."""
    digest = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(),
                                            digest_size=8).digest(), "little")
    table = _table(dim)
    vector = (4.0 * table[digest % _TABLE_ROWS] + 2.0 * table[(digest >> 10) % _TABLE_ROWS]
              + table[(digest >> 20) % _TABLE_ROWS])
    return vector / np.sqrt(np.dot(vector, vector))


class SyntheticEmbedder:
    """Duck-types :class:`sidecar.model.Embedder` (info, embed, capacity_tokens)
    for one model of SHM_EMBED_MODELS: an embedding model's vectors have
    SHM_EMBED_SYNTHETIC_DIM dimensions; a reranker's score is the first
    component of a synthetic vector of the pair's ids and segment split, a
    classifier's logits the first (one per label of its folder)."""

    is_cuda = False
    uses_cpu = False  # the call sleeps: waiters may spin on the spare cores

    def __init__(self, settings: Settings, spec: model_files.ModelSpec | None = None):
        spec = spec or model_files.model_specs(settings)[0]
        path = spec.path
        self.call_ns = settings.synthetic_us * 1000
        dim, activation = settings.synthetic_dim, Activation.IDENTITY
        if spec.kind == ModelKind.RERANK:
            dim, activation = 1, Activation.SIGMOID
        elif spec.kind == ModelKind.CLASSIFY:  # its folder's labels, scored from a synthetic vector
            labels = model_files.classifier_config(path)
            dim = len(labels.labels)
            activation = labels.activation
        self.info = ModelInfo(
            name=spec.name if settings.models else "synthetic:" + model_files.fit_name(spec.name, len("synthetic:")),
            path=str(path),
            tokenizer_path=str(model_files.tokenizer_file(path)),
            dim=dim,
            max_seq_length=model_files.max_seq_length(path),
            vocab_size=model_files.vocab_size(path),
            device="synthetic",
            kind=spec.kind,
            type_vocab_size=0 if spec.kind == ModelKind.EMBED else 2,
            activation=activation,
            matryoshka=spec.matryoshka or model_files.text_options(path).matryoshka,
        )
        self.capacity_tokens = max(settings.call_tokens, self.info.max_seq_length)
        self._out = np.empty((settings.max_batch_texts, self.info.dim), np.float32)
        # A call's time does not grow with its rows (a GPU's shape): the token budget decides.
        self.call_rows = min(settings.call_rows or settings.max_batch_texts, settings.max_batch_texts)

    def embed(self, seqs: list[np.ndarray], segments: list[int] | None = None) -> np.ndarray:
        end = time.monotonic_ns() + self.call_ns
        out = self._out[: len(seqs)]
        if self.info.kind != ModelKind.EMBED:
            width = max(8, self.info.dim)
            for i, ids in enumerate(seqs):
                split = segments[i] if segments is not None else 0
                out[i] = 4.0 * synthetic_vector(np.append(ids, split), width)[: self.info.dim]
        else:
            for i, ids in enumerate(seqs):
                out[i] = synthetic_vector(ids, self.info.dim)
        left = end - time.monotonic_ns() - SPIN_TAIL_NS
        if left > 0:
            time.sleep(left / 1e9)
        while time.monotonic_ns() < end:
            pass
        return out
