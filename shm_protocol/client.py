"""The worker-side client: tokenize, write into this process's ring, wait,
copy the vectors out. The lease on the ring is :mod:`.session`, the
tokenizer and text checks :mod:`.tokenizer`, the SentenceTransformer drop-in
:mod:`.dropin`; their public names are re-exported here.

Workers never import torch: the client needs numpy, posix_ipc and tokenizers.
One :class:`EmbeddingClient` per process is enough; it is thread-safe (each
thread's request takes its own slots of the process's ring). A process that
forks gets a ring of its own on its first call in the child.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from loguru import logger

from . import classify, long_inputs, model_files, tokens
from .classify import ClassifyResult
from .config import Settings
from .dropin import SentenceTransformerAPI
from .errors import (
    InvalidInput,
    NoRingAvailable,
    ShmEmbedError,
    SidecarUnavailable,
)
from .layout import Activation, ModelEntry, ModelKind
from .region import Region
from .segments import Names, pid_alive
from .session import Session
from .tokenizer import WorkerTokenizer, check_texts, check_token_budget, preload_tokenizer

#: Times a request that meets a takeover (its sidecar drains for, or has
#: handed the namespace over to, a successor) runs again on the new epoch.
TAKEOVER_RETRIES = 3

#: How often a request waiting for a successor looks for its epoch.
TAKEOVER_POLL_S = 0.005

__all__ = [
    "ClassifyResult", "EmbedResult", "EmbeddingBackend", "EmbeddingClient", "RerankResult", "SentenceTransformerAPI",
    "WorkerTokenizer", "check_texts", "check_token_budget", "preload_tokenizer",
]


@dataclass
class EmbedResult:
    """Vectors of one request with what it cost."""

    vectors: np.ndarray  # float32 (n_texts, dim), in input order
    token_counts: np.ndarray  # int (n_texts,): tokens each text used after truncation
    queue_ns: int  # longest time a part of the request waited in the sidecar's queue
    compute_ns: int  # time of the model calls that served it (max over parts)
    slots_used: int
    tokenize_ns: int = 0  # time this process spent tokenizing
    model: str = ""  # the served model that embedded them

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass
class RerankResult:
    """Scores of one rerank request with what it cost."""

    scores: np.ndarray  # float32 (n_documents,), in input order
    token_counts: np.ndarray  # int (n_documents,): tokens of each (query, document) pair after truncation
    model: str
    queue_ns: int
    compute_ns: int
    tokenize_ns: int = 0

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())


@runtime_checkable
class EmbeddingBackend(Protocol):
    """What the web app and retrieval need from an embedding client: the
    sidecar's :class:`EmbeddingClient`, the local fallback, or a fake in tests."""

    def embed_detailed(self, texts: Sequence[str], *, truncate: bool | None = None, normalize: bool = False,
                       max_tokens: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                       dimensions: int | None = None, model: str | None = None,
                       truncation_direction: str | None = None, chunk: bool | None = None) -> EmbedResult: ...

    def embed(self, texts: Sequence[str], *, truncate: bool | None = None, normalize: bool = False,
              prompt: str | None = None, prompt_name: str | None = None,
              dimensions: int | None = None, model: str | None = None, **options) -> np.ndarray: ...

    def tokenize(self, texts: Sequence[str], *, model: str | None = None, add_special_tokens: bool = True,
                 prompt: str | None = None, prompt_name: str | None = None,
                 max_tokens: int | None = None) -> list: ...

    def decode(self, ids, *, model: str | None = None, skip_special_tokens: bool = True) -> list[str]: ...

    def prompts(self, model: str | None = None) -> dict[str, str]: ...

    def rerank_detailed(self, query: str, documents: Sequence[str], *, model: str | None = None,
                        raw_scores: bool = False, truncate: bool = True, max_tokens: int | None = None,
                        prompt: str | None = None, prompt_name: str | None = None) -> RerankResult: ...

    def classify_detailed(self, inputs: Sequence, *, model: str | None = None, raw_scores: bool = False,
                          truncate: bool = True, max_tokens: int | None = None) -> ClassifyResult: ...

    def classify(self, inputs: Sequence, *, model: str | None = None, raw_scores: bool = False,
                 truncate: bool = True) -> list[list[dict]]: ...

    def info(self) -> dict: ...

    def stats(self): ...

    def close(self) -> None: ...


class EmbeddingClient(SentenceTransformerAPI):
    """Get sentence embeddings from the namespace's sidecar through shared memory.

    >>> client = EmbeddingClient.connect()
    >>> vectors = client.embed(["hello world", "shared memory"])   # (2, dim) float32
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.names = Names(self.settings.namespace)
        self._session: Session | None = None
        self._lock = threading.Lock()
        # Per model of the sidecar's table (by index): its tokenizer and text options.
        self._tokenizers: dict[int, WorkerTokenizer] = {}
        self._options: dict[int, model_files.TextOptions] = {}
        self._labels: dict[int, tuple[str, ...]] = {}  # a classifier's labels, from its folder's config.json
        self._closed = False
        self._finalizer = weakref.finalize(self, lambda: None)

    @classmethod
    def connect(cls, settings: Settings | None = None, *, lazy: bool = False) -> EmbeddingClient:
        """A client for the namespace in ``settings`` (default: from the
        environment). Unless ``lazy``, attach now and raise SidecarUnavailable
        when no sidecar serves; a lazy client attaches on its first call."""
        client = cls(settings)
        if not lazy:
            client._get_session()
        return client

    # -- attachment ---------------------------------------------------------------
    def _get_session(self) -> Session:
        """The live session, attaching or re-attaching as needed.

        Lease rules: a stalled or stopping sidecar of the same epoch keeps
        our ring (the call fails fast with SidecarUnavailable and the next
        one finds it again); only a new epoch (a restarted sidecar) gives a
        new lease, after the old one is handed back. A forked child leases a
        ring of its own and leaves the parent's alone."""
        if self._closed:
            raise SidecarUnavailable("client is closed", reason="closed")
        sess = self._session
        stale = self.settings.stale_after_s
        pid = os.getpid()
        if sess is not None and sess.pid == pid and sess.live.ok(int(stale * 1e9)):
            return sess
        with self._lock:
            if self._closed:
                raise SidecarUnavailable("client is closed", reason="closed")
            sess = self._session
            if sess is not None and sess.pid == pid:
                reason = sess.region.unavailable_reason(stale, thorough=True)
                if reason is not None and sess.region.successor_pid():
                    self._await_successor(sess)
                    reason = sess.region.unavailable_reason(stale, thorough=True)
                if reason is None:
                    return sess
                if not self._replaced(sess):
                    raise SidecarUnavailable(f"the sidecar cannot serve: {reason}", reason=reason)
                # A new sidecar serves the namespace (or none does). Other
                # threads may still wait on the old session (they see the dead
                # sidecar and fail): it is unmapped once the last one leaves.
                self._session = None
                self._finalizer.detach()
                sess.close()
            self._session = None  # a forked child drops the parent's session untouched
            sess = self._attach()
            # A client dropped without close() (or alive at interpreter exit)
            # still hands its ring back: leased rings never outlive clients.
            self._finalizer = weakref.finalize(self, Session.release_in_owner, sess)
            self._session = sess
            return sess

    def _await_successor(self, sess: Session) -> None:
        """``sess``'s sidecar drains for a successor or has handed the
        namespace over (layout: Takeover): wait, at most ``timeout_s``, until
        a new epoch serves, the old sidecar serves again (its successor died)
        or the successor is gone."""
        stale = self.settings.stale_after_s
        deadline = time.monotonic() + self.settings.timeout_s
        while time.monotonic() < deadline:
            if sess.region.unavailable_reason(stale) is None or not sess.region.successor_pid():
                return
            try:
                current = Region.attach(self.names, readonly=True, with_data=False)
            except ShmEmbedError:
                current = None  # the successor is creating the namespace
            if current is not None:
                try:
                    if current.epoch != sess.epoch and current.unavailable_reason(stale) is None:
                        return
                finally:
                    current.close()
            time.sleep(TAKEOVER_POLL_S)

    def _request(self, call):
        """``call(sess)`` on the live session, kept mapped meanwhile. A
        request that meets a takeover runs again from the start on the new
        epoch (re-tokenized: the new models may tokenize otherwise), so a
        request never mixes answers of two epochs; the wait for the new one
        is in _get_session."""
        for attempt in range(TAKEOVER_RETRIES + 1):
            sess = self._get_session()
            try:
                sess.enter()
            except SidecarUnavailable:
                if self._closed or attempt == TAKEOVER_RETRIES:
                    raise
                continue  # another thread replaced the session meanwhile
            try:
                return call(sess)
            except SidecarUnavailable:
                if attempt == TAKEOVER_RETRIES or not sess.region.successor_pid():
                    raise
                logger.debug("a request met the takeover of epoch {:x}; running it again", sess.epoch)
            finally:
                sess.leave()
        raise AssertionError("unreachable")

    def _replaced(self, sess: Session) -> bool:
        """Whether the namespace is no longer served by ``sess``'s epoch."""
        try:
            current = Region.attach(self.names, readonly=True, with_data=False)
        except ShmEmbedError:  # gone, being created, or another layout: not ours any more
            return True
        try:
            return current.epoch != sess.epoch
        finally:
            current.close()

    def _attach(self) -> Session:
        region = Region.attach(self.names)
        try:
            region.check_available(self.settings.stale_after_s, thorough=True)
            models = checked_models(region)
            self._load_tokenizer(models)  # before the lease: a failure here must not hold a ring
            ring = self._claim_ring(region)
        except BaseException:
            region.close()
            raise
        try:
            sess = Session(region, ring, self.settings, models)
            sess.tokenizers, sess.options, sess.labels = self._tokenizers, self._options, self._labels
        except BaseException:
            region.rings[ring]["owner_pid"] = 0  # ours, and every slot of a fresh lease is free
            region.close()
            raise
        logger.debug(
            "attached to {} epoch {:x}, ring {} (pid {})", self.names.namespace, region.epoch, ring, os.getpid()
        )
        return sess

    def _load_tokenizer(self, models: list[ModelEntry]) -> None:
        """Each served model's tokenizer (kept from an earlier epoch when
        the file and limit are the same) and text options."""
        tokenizers, options, labels = {}, {}, {}
        for entry in models:
            if entry.kind == ModelKind.CLASSIFY:  # checked against the table's label count (checked_models)
                labels[entry.index] = model_files.classifier_config(Path(entry.tokenizer_path).parent).labels
            path, limit = entry.tokenizer_path, entry.max_seq_length
            tok = self._tokenizers.get(entry.index)
            if tok is None or tok.path != path or tok.max_seq_length != limit:
                try:
                    tok = WorkerTokenizer(path, limit)
                except Exception as exc:  # the tokenizers library raises plain Exceptions
                    raise SidecarUnavailable(f"cannot load the tokenizer the sidecar names ({path}): {exc}",
                                             reason="tokenizer") from None
            tokenizers[entry.index] = tok
            # The prompts of the model folder the tokenizer lies in; the
            # sidecar's table says whether it may be truncated (Matryoshka).
            options[entry.index] = model_files.text_options(Path(path).parent, entry.matryoshka)
        self._tokenizers, self._options, self._labels = tokenizers, options, labels

    def _claim_ring(self, region: Region) -> int:
        """Lease a free ring. A dead owner's ring is freed by the sidecar's
        reaper (which also resets its slots), so only owner 0 is taken here.
        Each client object leases its own ring, even two in one process."""
        pid = os.getpid()
        deadline = time.monotonic() + max(0.5, 5 * self.settings.heartbeat_s)
        while True:
            with region.lock_rings():
                owners = region.rings["owner_pid"]
                free = np.flatnonzero(owners == 0)
                if len(free):
                    r = int(free[0])
                    region.rings[r]["owner_pid"] = pid
                    region.rings[r]["leases"] += 1
                    region.rings[r]["claimed_ns"] = time.time_ns()
                    region.rings[r]["inflight"] = 0
                    region.rings[r]["busy_ns"] = 0
                    region.rings[r]["busy_at_ns"] = time.monotonic_ns()
                    return r
                dead = [int(o) for o in owners if not pid_alive(int(o))]
            if time.monotonic() > deadline:
                raise NoRingAvailable(
                    f"all {region.params.n_rings} rings are leased "
                    f"({len(dead)} to dead processes not yet reaped); raise SHM_EMBED_RINGS"
                )
            time.sleep(self.settings.heartbeat_s / 2)

    def close(self) -> None:
        """Hand this process's ring back and unmap (once requests still
        running have left). The client cannot be used after."""
        with self._lock:
            self._closed = True
            sess, self._session = self._session, None
        if sess is not None and sess.pid == os.getpid():
            self._finalizer.detach()
            sess.close()

    def publish_load(self, inflight: int, busy_ns: int, at_ns: int) -> None:
        """Write this process's load into its ring's row (layout: RING_DTYPE),
        where the Gunicorn master reads it to scale the workers: requests in
        progress, and request-nanoseconds spent up to ``at_ns`` (monotonic).
        Nothing without a ring of this process's own; never attaches."""
        sess = self._session
        if sess is None or sess.pid != os.getpid():
            return
        try:
            sess.enter()
        except SidecarUnavailable:
            return
        try:
            row = sess.region.rings[sess.ring]
            if int(row["owner_pid"]) == sess.pid:
                row["busy_ns"] = busy_ns
                row["busy_at_ns"] = at_ns
                row["inflight"] = inflight
        finally:
            sess.leave()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- information ------------------------------------------------------------------
    @contextlib.contextmanager
    def _using(self) -> Iterator[Session]:
        """The live session, kept mapped while the caller reads it."""
        sess = self._get_session()
        sess.enter()
        try:
            yield sess
        finally:
            sess.leave()

    def info(self) -> dict:
        with self._using() as sess:
            return self._info(sess)

    @staticmethod
    def _info(sess: Session) -> dict:
        region, params = sess.region, sess.params
        default = model_files.default_model(sess.models)
        return {
            "model": default.name,
            "dimension": default.dim,
            "max_seq_length": default.max_seq_length,
            "vocab_size": default.vocab_size,
            "dtype": default.dtype,
            "models": [model_card(m) for m in sess.models],
            "device": region.device,
            "epoch": f"{region.epoch:016x}",
            "sidecar_pid": region.sidecar_pid,
            "ring": sess.ring,
            "slots_per_ring": params.slots_per_ring,
            "slot_texts": params.max_texts,
            "slot_tokens": params.max_tokens,
            "cache": sess.cache.stats() if sess.cache is not None else {"enabled": False},
        }

    def stats(self):
        """The sidecar's own counters (a :class:`shm_protocol.stats.Snapshot`)."""
        from .stats import snapshot

        with self._using() as sess:
            return snapshot(sess.region, self.settings.stale_after_s)

    @property
    def dimension(self) -> int:
        """The default model's vector size."""
        return model_files.default_model(self._get_session().models).dim

    def models(self) -> list[dict]:
        """Every model the sidecar serves (the default first): name, kind,
        dimension, max_seq_length, ..."""
        return [model_card(m) for m in self._get_session().models]

    def model(self, name: str | None = None, kind: str = "embed") -> dict:
        """The model a call for ``kind`` ("embed", "rerank" or "classify") naming
        ``name`` would use (None: the default); ModelNotFound otherwise."""
        return model_card(model_files.find_model(self._get_session().models, name, ModelKind[kind.upper()]))

    def tokenize(self, texts: Sequence[str], *, model: str | None = None, add_special_tokens: bool = True,
                 prompt: str | None = None, prompt_name: str | None = None,
                 max_tokens: int | None = None) -> list[tokens.TokenizedText]:
        """The tokens of each of ``texts`` as an embed call with the same
        prompt options would read it (untruncated; see :mod:`.tokens`),
        from this process's copy of the model's tokenizer: no round trip.
        ``model``: any served model, a reranker too (None: the default);
        RequestTooLarge past ``max_tokens`` in all."""
        m = self._any_model(model)
        prompt = self._options[m.index].resolve_prompt(prompt, prompt_name)
        return tokens.tokenize_texts(self._tokenizers[m.index], texts, prompt=prompt,
                                     add_special_tokens=add_special_tokens, max_tokens=max_tokens)

    def _any_model(self, model: str | None) -> ModelEntry:
        """The served model ``model`` names, of either kind (None: the default)."""
        models = self._get_session().models
        if model is None:
            return model_files.default_model(models)
        found = model_files.named(models, model, lambda m: m.name)
        return found if found is not None else model_files.find_model(models, model, ModelKind.EMBED)

    def prompts(self, model: str | None = None) -> dict[str, str]:
        """The prompts of an embedding model (``model`` by name, None: the
        default), by name, as its config_sentence_transformers.json lists them."""
        m = model_files.find_model(self._get_session().models, model, ModelKind.EMBED)
        return dict(self._options[m.index].prompts)

    def decode(self, ids, *, model: str | None = None, skip_special_tokens: bool = True) -> list[str]:
        """The text of token ``ids`` (a list of ids, or a list of such lists:
        one string per list); InvalidInput for an id outside the vocabulary.
        ``model``: any served model, a reranker too (None: the default)."""
        m = self._any_model(model)
        return tokens.decode_ids(self._tokenizers[m.index], ids, vocab_size=m.vocab_size,
                                 skip_special_tokens=skip_special_tokens)

    def text_tokenizer(self, model: str | None = None, prompt: str | None = None) -> tuple[WorkerTokenizer, str | None]:
        """An embedding model's tokenizer, and the prompt an embed call with
        ``prompt`` puts before each text (None: the model's default one)."""
        sess = self._get_session()
        m = model_files.find_model(sess.models, model, ModelKind.EMBED)
        return self._tokenizers[m.index], self._options[m.index].resolve_prompt(prompt, None)

    # -- embedding --------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, truncate: bool | None = None, normalize: bool = False,
              prompt: str | None = None, prompt_name: str | None = None,
              dimensions: int | None = None, model: str | None = None, **options) -> np.ndarray:
        """Vectors of ``texts`` (float32, one row per text, in order);
        ``options``: truncation_direction, chunk (see embed_detailed)."""
        return self.embed_detailed(texts, truncate=truncate, normalize=normalize, prompt=prompt,
                                   prompt_name=prompt_name, dimensions=dimensions, model=model, **options).vectors

    def embed_detailed(
        self, texts: Sequence[str], *, truncate: bool | None = None, normalize: bool = False,
        max_tokens: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
        dimensions: int | None = None, model: str | None = None, truncation_direction: str | None = None,
        chunk: bool | None = None,
    ) -> EmbedResult:
        """Vectors and details of ``texts``, as ``SentenceTransformer.encode``
        gives them: ``prompt`` (a literal prefix) or ``prompt_name`` (one of the
        model's prompts; the model's default prompt when neither is given) is
        prepended to each text; ``dimensions`` cuts the vectors (Matryoshka
        models only) before ``normalize``. A text over the model's limit is
        cut at its end (``truncate=True``) or start (with
        ``truncation_direction="left"``), refused (``truncate=False``:
        RequestTooLarge) or embedded in windows whose vectors are averaged
        (``chunk=True``; see :mod:`.long_inputs`); options left None follow
        SHM_EMBED_LONG_INPUTS. ``max_tokens`` caps the tokens
        (after truncation) the call may send, over all texts: RequestTooLarge
        above it, before anything reaches the sidecar (the web service's
        per-request budget). ``model`` picks one of the sidecar's embedding
        models by name (None: the default); ModelNotFound for another."""
        texts = check_texts(texts)
        policy = long_inputs.resolve_policy(truncate, truncation_direction, chunk, self.settings.long_inputs)

        def call(sess: Session) -> EmbedResult:
            entry = model_files.find_model(sess.models, model, ModelKind.EMBED)
            opts = sess.options[entry.index]
            resolved = opts.resolve_prompt(prompt, prompt_name)
            dims = opts.check_dimensions(dimensions, entry.dim, entry.name)
            if not texts:
                return EmbedResult(np.empty((0, dims or entry.dim), np.float32), np.empty(0, np.int64), 0, 0, 0, 0,
                                   entry.name)
            out = np.empty((len(texts), entry.dim), dtype=np.float32)
            # Texts found in the embedding cache are answered here, before any
            # tokenizing (shm_protocol.cache). Chunked texts are not cached: the
            # sidecar sees only their windows.
            found = None
            if sess.cache is not None and policy != long_inputs.CHUNK:
                found = sess.cache.lookup(texts, out, entry, resolved, policy)
            if found is not None and not found.missing:
                check_token_budget(found.lengths, max_tokens)
                return EmbedResult(shape_vectors(out, dims, normalize), found.lengths, 0, 0, 0, 0, entry.name)
            tok = sess.tokenizers[entry.index].tokenize_request(texts if found is None else found.texts,
                                                                prompt=resolved, truncate=True, max_tokens=max_tokens,
                                                                policy=policy)
            rows = np.empty((len(tok.ids), entry.dim), dtype=np.float32)  # a row per text, or per window when chunked
            lengths = tok.token_counts if found is None else found.lengths
            if found is not None:
                lengths[found.missing] = tok.token_counts
                check_token_budget(lengths, max_tokens)
            queue_ns, compute_ns, used = sess.run(tok.ids, tok.lengths, rows, entry.index,
                                                  cache_keys=None if found is None else found.keys)
            if tok.owners is not None:  # chunked (never with the cache): each text's windows averaged
                rows = long_inputs.combine_windows(rows, tok.owners, tok.weights, len(texts))
            if found is None:
                out = rows
            else:
                out[found.missing] = rows
            return EmbedResult(shape_vectors(out, dims, normalize), lengths, queue_ns, compute_ns, used,
                               tok.tokenize_ns, entry.name)

        return self._request(call)

    # -- reranking --------------------------------------------------------------------
    def rerank(self, query: str, documents: Sequence[str], *, model: str | None = None,
               raw_scores: bool = False, truncate: bool = True, prompt: str | None = None,
               prompt_name: str | None = None) -> np.ndarray:
        """Relevance scores (float32, one per document, in input order) of
        ``documents`` for ``query``, as ``CrossEncoder(path).predict(pairs)``
        gives them (its activation applied, unless ``raw_scores``)."""
        return self.rerank_detailed(query, documents, model=model, raw_scores=raw_scores, truncate=truncate,
                                    prompt=prompt, prompt_name=prompt_name).scores

    def rerank_detailed(self, query: str, documents: Sequence[str], *, model: str | None = None,
                        raw_scores: bool = False, truncate: bool = True, max_tokens: int | None = None,
                        prompt: str | None = None, prompt_name: str | None = None) -> RerankResult:
        """Scores and details of ``documents`` for ``query`` from one of the
        sidecar's rerankers (``model`` by name; None: the first). Each
        (query, document) pair is tokenized here as a pair and scored in the
        sidecar, batched with other workers' pairs. The cross-encoder's
        prompt (``prompt``, ``prompt_name`` or its default one) is put before
        the query, as ``CrossEncoder.predict`` puts it."""
        if not isinstance(query, str):
            raise InvalidInput(f"query must be a string, not {type(query).__name__}")
        documents = check_texts(documents)

        def call(sess: Session) -> RerankResult:
            entry = model_files.find_model(sess.models, model, ModelKind.RERANK)
            prompted = (sess.options[entry.index].resolve_prompt(prompt, prompt_name) or "") + query
            if not documents:
                return RerankResult(np.empty(0, np.float32), np.empty(0, np.int64), entry.name, 0, 0)
            tok = sess.tokenizers[entry.index].tokenize_pairs(prompted, documents, truncate=truncate,
                                                              max_tokens=max_tokens)
            out = np.empty((len(documents), entry.dim), dtype=np.float32)
            queue_ns, compute_ns, _ = sess.run(tok.ids, tok.lengths, out, entry.index, tok.segments)
            scores = np.ascontiguousarray(out[:, 0])
            if not raw_scores:
                scores = activate(scores, entry.activation)
            return RerankResult(scores, tok.lengths, entry.name, queue_ns, compute_ns, tok.tokenize_ns)

        return self._request(call)

    # -- classification -----------------------------------------------------------------
    def classify(self, inputs: Sequence, *, model: str | None = None, raw_scores: bool = False,
                 truncate: bool = True) -> list[list[dict]]:
        """Per input (a text, or a (text, text_pair) pair), every label of the
        classifier with its score, best first: what transformers'
        ``pipeline("text-classification", top_k=None)`` answers."""
        return self.classify_detailed(inputs, model=model, raw_scores=raw_scores, truncate=truncate).ranked()

    def classify_detailed(self, inputs: Sequence, *, model: str | None = None, raw_scores: bool = False,
                          truncate: bool = True, max_tokens: int | None = None) -> ClassifyResult:
        """Label scores and details of ``inputs`` from one of the sidecar's
        classifiers (``model`` by name; None: the first): the logits the
        model gives through its activation (softmax, or sigmoid for a
        multi-label model), unless ``raw_scores``. A text over the model's
        limit is cut unless ``truncate`` is false (RequestTooLarge), as are
        more than ``max_tokens`` tokens in all."""
        inputs = classify.check_inputs(inputs)

        def call(sess: Session) -> ClassifyResult:
            entry = model_files.find_model(sess.models, model, ModelKind.CLASSIFY)
            labels = sess.labels[entry.index]
            if not inputs:
                return ClassifyResult(np.empty((0, entry.dim), np.float32), labels, np.empty(0, np.int64), entry.name,
                                      0, 0)
            tok = classify.tokenize_inputs(sess.tokenizers[entry.index], inputs, truncate=truncate,
                                           max_tokens=max_tokens)
            out = np.empty((len(inputs), entry.dim), dtype=np.float32)
            queue_ns, compute_ns, _ = sess.run(tok.ids, tok.lengths, out, entry.index, tok.segments)
            scores = out if raw_scores else classify.activate_labels(out, entry.activation)
            return ClassifyResult(scores, labels, tok.lengths, entry.name, queue_ns, compute_ns, tok.tokenize_ns)

        return self._request(call)


def checked_models(region: Region) -> list[ModelEntry]:
    """The sidecar's model table, read once and checked against the slots'
    sizes and each model's own folder (LayoutMismatch on a table someone
    wrote into the control segment). The client keeps this copy for the
    epoch: a table changed after attach changes no request's shape."""
    models = region.models()
    synthetic = region.device == "synthetic"
    for m in models:
        model_files.check_entry_files(m, synthetic)
    return models



def shape_vectors(vecs: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Cut ``vecs`` to ``dimensions`` (None: keep all), then normalize rows
    if asked: the order SentenceTransformer.encode(truncate_dim=...,
    normalize_embeddings=...) applies them in."""
    if dimensions is not None:
        vecs = np.ascontiguousarray(vecs[:, :dimensions])
    if normalize:
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        np.divide(vecs, norms, out=vecs, where=norms > 0)
    return vecs


def activate(scores: np.ndarray, activation: Activation) -> np.ndarray:
    """A reranker's raw scores through its activation, as CrossEncoder.predict applies it."""
    if activation == Activation.SIGMOID:
        return (1.0 / (1.0 + np.exp(-scores.astype(np.float64)))).astype(np.float32)
    return scores


def model_card(m: ModelEntry) -> dict:
    """What the client reports about one served model."""
    return {"name": m.name, "kind": m.kind.name.lower(), "dimension": m.dim, "max_seq_length": m.max_seq_length,
            "vocab_size": m.vocab_size, "matryoshka": m.matryoshka, "index": m.index,
            "dtype": m.dtype}
