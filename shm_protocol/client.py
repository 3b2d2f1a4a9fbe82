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
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import posix_ipc
from loguru import logger

from . import model_files
from .config import Settings
from .dropin import SentenceTransformerAPI
from .errors import (
    InvalidInput,
    ModelFailed,
    NoRingAvailable,
    RingFull,
    ShmEmbedError,
    SidecarTimeout,
    SidecarUnavailable,
    SlotRejected,
)
from .layout import ETA_NONE, ETA_PARK, SLOT_DONE, SLOT_ERROR, Activation, ModelEntry, ModelKind, SlotError
from .region import Region
from .segments import Names, pid_alive
from .session import Session
from .tokenizer import WorkerTokenizer, check_texts, check_token_budget, preload_tokenizer

__all__ = [
    "EmbedResult", "EmbeddingBackend", "EmbeddingClient", "RerankResult", "SentenceTransformerAPI", "WorkerTokenizer",
    "check_texts", "check_token_budget", "preload_tokenizer",
]

# First look for a slot's ETA after submitting it; an idle sidecar has picked
# it up by then. Doubles with each look that finds none.
PICKUP_LOOK_S = 0.002


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

    def embed_detailed(self, texts: Sequence[str], *, truncate: bool = True, normalize: bool = False,
                       max_tokens: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                       dimensions: int | None = None, model: str | None = None) -> EmbedResult: ...

    def embed(self, texts: Sequence[str], *, truncate: bool = True, normalize: bool = False,
              prompt: str | None = None, prompt_name: str | None = None,
              dimensions: int | None = None, model: str | None = None) -> np.ndarray: ...

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
        if sess is not None and sess.pid == pid and sess.region.unavailable_reason(stale) is None:
            return sess
        with self._lock:
            if self._closed:
                raise SidecarUnavailable("client is closed", reason="closed")
            sess = self._session
            if sess is not None and sess.pid == pid:
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
            self._load_tokenizer(region)  # before the lease: a failure here must not hold a ring
            ring = self._claim_ring(region)
        except BaseException:
            region.close()
            raise
        try:
            sess = Session(region, ring)
        except BaseException:
            region.rings[ring]["owner_pid"] = 0  # ours, and every slot of a fresh lease is free
            region.close()
            raise
        logger.debug(
            "attached to {} epoch {:x}, ring {} (pid {})", self.names.namespace, region.epoch, ring, os.getpid()
        )
        return sess

    def _load_tokenizer(self, region: Region) -> None:
        """Each served model's tokenizer (kept from an earlier epoch when
        the file and limit are the same) and text options."""
        tokenizers, options = {}, {}
        for m in region.models():
            path, limit = m.tokenizer_path, m.max_seq_length
            tok = self._tokenizers.get(m.index)
            if tok is None or tok.path != path or tok.max_seq_length != limit:
                try:
                    tok = WorkerTokenizer(path, limit)
                except Exception as exc:  # the tokenizers library raises plain Exceptions
                    raise SidecarUnavailable(f"cannot load the tokenizer the sidecar names ({path}): {exc}",
                                             reason="tokenizer") from None
            tokenizers[m.index] = tok
            # The prompts of the model folder the tokenizer lies in; the
            # sidecar's table says whether it may be truncated (Matryoshka).
            options[m.index] = model_files.text_options(Path(path).parent, m.matryoshka)
        self._tokenizers, self._options = tokenizers, options

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
        r, p = sess.region, sess.params
        default = model_files.default_model(sess.models)
        return {
            "model": default.name,
            "dimension": default.dim,
            "max_seq_length": default.max_seq_length,
            "vocab_size": default.vocab_size,
            "models": [model_card(m) for m in sess.models],
            "device": r.device,
            "epoch": f"{r.epoch:016x}",
            "sidecar_pid": r.sidecar_pid,
            "ring": sess.ring,
            "slots_per_ring": p.slots_per_ring,
            "slot_texts": p.max_texts,
            "slot_tokens": p.max_tokens,
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
        """The model a call for ``kind`` ("embed" or "rerank") naming
        ``name`` would use (None: the default); ModelNotFound otherwise."""
        return model_card(model_files.find_model(self._get_session().models, name, ModelKind[kind.upper()]))

    def tokenize(self, texts: Sequence[str], *, model: str | None = None) -> list:
        sess = self._get_session()
        return self._tokenizers[model_files.find_model(sess.models, model, ModelKind.EMBED).index].encode(
            list(texts))

    def text_tokenizer(self, model: str | None = None, prompt: str | None = None) -> tuple[WorkerTokenizer, str | None]:
        """An embedding model's tokenizer, and the prompt an embed call with
        ``prompt`` puts before each text (None: the model's default one)."""
        sess = self._get_session()
        m = model_files.find_model(sess.models, model, ModelKind.EMBED)
        return self._tokenizers[m.index], self._options[m.index].resolve_prompt(prompt, None)

    # -- embedding --------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, truncate: bool = True, normalize: bool = False,
              prompt: str | None = None, prompt_name: str | None = None,
              dimensions: int | None = None, model: str | None = None) -> np.ndarray:
        """Vectors of ``texts`` (float32, one row per text, in order)."""
        return self.embed_detailed(texts, truncate=truncate, normalize=normalize, prompt=prompt,
                                   prompt_name=prompt_name, dimensions=dimensions, model=model).vectors

    def embed_detailed(
        self, texts: Sequence[str], *, truncate: bool = True, normalize: bool = False,
        max_tokens: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
        dimensions: int | None = None, model: str | None = None,
    ) -> EmbedResult:
        """Vectors and details of ``texts``, as ``SentenceTransformer.encode``
        gives them: ``prompt`` (a literal prefix) or ``prompt_name`` (one of the
        model's prompts; the model's default prompt when neither is given) is
        prepended to each text; ``dimensions`` cuts the vectors (Matryoshka
        models only) before ``normalize``. ``max_tokens`` caps the tokens
        (after truncation) the call may send, over all texts: RequestTooLarge
        above it, before anything reaches the sidecar (the web service's
        per-request budget). ``model`` picks one of the sidecar's embedding
        models by name (None: the default); ModelNotFound for another."""
        texts = check_texts(texts)
        sess = self._get_session()
        m = model_files.find_model(sess.models, model, ModelKind.EMBED)
        opts = self._options[m.index]
        prompt = opts.resolve_prompt(prompt, prompt_name)
        dims = opts.check_dimensions(dimensions, m.dim, m.name)
        if not texts:
            return EmbedResult(np.empty((0, dims or m.dim), np.float32), np.empty(0, np.int64), 0, 0, 0, 0, m.name)
        tok = self._tokenizers[m.index].tokenize_request(texts, prompt=prompt, truncate=truncate,
                                                         max_tokens=max_tokens)
        out = np.empty((len(texts), m.dim), dtype=np.float32)
        sess.enter()
        try:
            queue_ns, compute_ns, used = self._run(sess, tok.ids, tok.lengths, out, m.index)
        finally:
            sess.leave()
        return EmbedResult(shape_vectors(out, dims, normalize), tok.lengths, queue_ns, compute_ns, used,
                           tok.tokenize_ns, m.name)

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
        sess = self._get_session()
        m = model_files.find_model(sess.models, model, ModelKind.RERANK)
        query = (self._options[m.index].resolve_prompt(prompt, prompt_name) or "") + query
        if not documents:
            return RerankResult(np.empty(0, np.float32), np.empty(0, np.int64), m.name, 0, 0)
        tok = self._tokenizers[m.index].tokenize_pairs(query, documents, truncate=truncate, max_tokens=max_tokens)
        out = np.empty((len(documents), m.dim), dtype=np.float32)
        sess.enter()
        try:
            queue_ns, compute_ns, _ = self._run(sess, tok.ids, tok.lengths, out, m.index, tok.segments)
        finally:
            sess.leave()
        scores = np.ascontiguousarray(out[:, 0])
        if not raw_scores:
            scores = activate(scores, m.activation)
        return RerankResult(scores, tok.lengths, m.name, queue_ns, compute_ns, tok.tokenize_ns)

    def _chunks(self, lengths: np.ndarray, p) -> list[tuple[int, int]]:
        """Split texts into runs that fit one slot (texts and tokens)."""
        chunks, start, toks = [], 0, 0
        for i, n in enumerate(lengths.tolist()):
            if i > start and (i - start >= p.max_texts or toks + n > p.max_tokens):
                chunks.append((start, i))
                start, toks = i, 0
            toks += n
        chunks.append((start, len(lengths)))
        return chunks

    def _run(self, sess: Session, id_lists: list[list[int]], lengths: np.ndarray,
             out: np.ndarray, model: int = 0, segments: np.ndarray | None = None) -> tuple[int, int, int]:
        chunks = self._chunks(lengths, sess.params)
        pending: list[tuple[int, int, int, int]] = []  # (slot, seq, start, end)
        failure: BaseException | None = None
        queue_ns = compute_ns = 0
        ci = 0
        try:
            while ci < len(chunks) or pending:
                if ci < len(chunks) and failure is None:
                    # Take a slot without waiting while we hold parts in flight;
                    # otherwise wait (bounded) for one.
                    s = sess.take_slot(None) if pending else self._wait_for_slot(sess)
                    if s is not None:
                        a, b = chunks[ci]
                        ids = id_lists[a] if b - a == 1 else np.fromiter(
                            itertools.chain.from_iterable(id_lists[a:b]),
                            dtype=np.int32, count=int(lengths[a:b].sum()),
                        )
                        try:
                            seq = sess.submit(s, ids, lengths[a:b], model,
                                              None if segments is None else segments[a:b])
                        except BaseException:
                            sess.abandon(s)
                            raise
                        pending.append((s, seq, a, b))
                        ci += 1
                        continue
                    if not pending:
                        raise RingFull(
                            f"all {sess.params.slots_per_ring} slots of this worker's ring stayed busy "
                            f"for {self.settings.ring_wait_s}s",
                            retry_after_s=1.0,
                        )
                if not pending:
                    break
                s, seq, a, b = pending.pop(0)
                try:
                    q, c = self._wait(sess, s, seq, out[a:b])
                    queue_ns, compute_ns = max(queue_ns, q), max(compute_ns, c)
                except (SlotRejected, SidecarUnavailable) as exc:
                    failure = failure or exc
                    if isinstance(exc, SidecarUnavailable):
                        # Nothing more will come from this sidecar.
                        for s2, seq2, *_ in pending:
                            sess.give_up(s2, seq2)
                        pending.clear()
        except BaseException:
            for s2, seq2, *_ in pending:
                sess.give_up(s2, seq2)
            raise
        if failure is not None:
            raise failure
        return queue_ns, compute_ns, len(chunks)

    def _wait_for_slot(self, sess: Session) -> int | None:
        """A free slot within the admission wait, or None (RingFull). Checks
        the sidecar while waiting: slots held by a dead sidecar never free up,
        and that is SidecarUnavailable, not RingFull."""
        deadline = time.monotonic() + self.settings.ring_wait_s
        while True:
            s = sess.take_slot(min(0.05, max(0.0, deadline - time.monotonic())))
            if s is not None:
                return s
            sess.region.check_available(self.settings.stale_after_s, thorough=True)
            if time.monotonic() >= deadline:
                return None

    def _wait(self, sess: Session, s: int, seq: int, dest: np.ndarray) -> tuple[int, int]:
        """Wait for slot ``s`` to be answered, copy its vectors into ``dest``.
        A wait that ends in any exception leaves the slot quarantined."""
        try:
            self._await_answer(sess, s, seq)
        except BaseException:
            sess.give_up(s, seq)
            raise
        v = sess.v
        queue_ns, compute_ns = int(v.queue_ns[s]), int(v.compute_ns[s])
        if int(v.state[s]) == SLOT_ERROR:
            code = int(v.error[s])
            sess.give_back(s)
            raise _slot_error(code)
        dest[:] = v.out[s, : len(dest), : dest.shape[1]]
        sess.give_back(s)
        return queue_ns, compute_ns

    def _await_answer(self, sess: Session, s: int, seq: int) -> None:
        """Spin, then park: block on the semaphore until shortly before the
        sidecar's ETA for the slot, then poll its state for a bounded time;
        if the answer is late, block again. The timer wake-up happens while
        the model still runs, so its cost is hidden. A sidecar that drains
        (a clean stop) still answers what it holds, so that is waited for."""
        sem = sess.sems[s]
        settings = self.settings
        poll = min(0.05, settings.stale_after_s / 4)
        spin_ns = settings.spin_us * 1000
        look = PICKUP_LOOK_S
        deadline = time.monotonic() + settings.timeout_s
        if sess.spin and _poll_slot(sess, s, seq, min(settings.idle_poll_us * 1000, int(settings.timeout_s * 1e9)),
                                    spin_ns):
            return
        while True:
            timeout = poll
            if spin_ns:
                eta = int(sess.eta_ns[s])
                if eta == ETA_NONE:
                    # Not picked up yet: look again for its ETA, less often the
                    # longer the queue (under load each look is a wasted wake-up).
                    timeout, look = look, min(poll, 2 * look)
                elif eta == ETA_PARK:  # a large batch: its waiters park
                    spin_ns = 0
                else:
                    now = time.monotonic_ns()
                    wake_at = eta - spin_ns
                    if now >= wake_at:
                        if _spin_until_done(sess, s, seq, eta + 2 * spin_ns):
                            return
                        spin_ns = 0  # late: park until the post
                        continue
                    timeout = min(poll, (wake_at - now) / 1e9)
            try:
                sem.acquire(timeout)
            except posix_ipc.SignalError:  # EINTR: a signal handler ran; wait on
                continue
            except posix_ipc.BusyError:
                if sess.answered(s, seq):  # answered, but its post was lost
                    return
                region = sess.region
                reason = region.unavailable_reason(settings.stale_after_s, thorough=True)
                if reason is not None and region.state_name == "draining":
                    # A draining sidecar answers what it holds, unless it died or hangs meanwhile.
                    reason = region.liveness_reason(settings.stale_after_s, thorough=True)
                if reason is not None:
                    raise SidecarUnavailable(f"while waiting for a result: {reason}", reason=reason) from None
                if time.monotonic() > deadline:
                    raise SidecarTimeout(f"no answer from the sidecar within {settings.timeout_s}s") from None
                continue
            if sess.answered(s, seq):
                return
            # A stale post from an abandoned request: keep waiting for ours.


#: Waiters that may poll at once under the spin policy: the cores this
#: process may run on, less one for the sidecar. More queued work than that
#: and waiters park (they would only take turns on the same cores).
SPIN_WAITERS = max(1, len(os.sched_getaffinity(0)) - 1)


def _poll_slot(sess: Session, s: int, seq: int, budget_ns: int, spin_ns: int) -> bool:
    """Under the spin policy: poll slot ``s`` from the moment it is submitted
    until it is answered (True), or until its ETA is far enough away to sleep
    on, the sidecar asks waiters to park, more work is queued than there are
    cores to poll on, the sidecar stops being available, or ``budget_ns``
    passes (False: the caller parks)."""
    state, seqs, etas, queued = sess.state, sess.seq, sess.eta_ns, sess.queued
    region = sess.region
    end = time.monotonic_ns() + budget_ns
    n = 0
    while True:
        if int(state[s]) in (SLOT_DONE, SLOT_ERROR) and int(seqs[s]) == seq:
            return True
        now = time.monotonic_ns()
        eta = int(etas[s])
        if eta == ETA_PARK or (eta > ETA_PARK and eta - now > 2 * spin_ns) or now > end:
            return False
        n += 1
        if n % 256 == 0 and (int(queued[0]) > SPIN_WAITERS or region.unavailable_reason(1e9) is not None):
            return False
        os.sched_yield()


def _spin_until_done(sess: Session, s: int, seq: int, until_ns: int) -> bool:
    """Poll slot ``s`` until it is answered or ``until_ns`` passes. The
    semaphore's post is left pending; the next take of the slot drains it."""
    state, seqs = sess.state, sess.seq
    while True:
        if int(state[s]) in (SLOT_DONE, SLOT_ERROR) and int(seqs[s]) == seq:
            return True
        if time.monotonic_ns() > until_ns:
            return False
        os.sched_yield()


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
            "vocab_size": m.vocab_size, "matryoshka": m.matryoshka, "index": m.index}


def _slot_error(code: int) -> Exception:
    try:
        err = SlotError(code)
    except ValueError:
        return SlotRejected(f"sidecar failed the request with unknown code {code}", code=code)
    if err == SlotError.MODEL_FAILED:
        return ModelFailed("the model failed on this batch (see the sidecar's log)", code=code)
    if err == SlotError.SHUTDOWN:
        return SidecarUnavailable("the sidecar stopped before serving this request", reason="shutdown")
    return SlotRejected(f"sidecar rejected the request: {err.name}", code=code)
