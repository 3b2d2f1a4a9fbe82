"""The original system's fallback, kept: embed with a local model in the
worker when IPC is off (USE_IPC_EMBEDDING=false), or while the sidecar is
unavailable (SHM_EMBED_FALLBACK=local). Also the original module-level API:
``get_embedding_client()``, ``get_embedding_model()``,
``is_using_ipc_embedding()``, ``generate_embeddings()``,
``get_active_operations_count()``.

Only this module imports torch in a worker, and only when it must.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from loguru import logger

from shm_protocol import long_inputs, model_files, tokens
from shm_protocol.client import EmbeddingClient, EmbedResult, shape_vectors
from shm_protocol.config import Settings
from shm_protocol.dropin import SentenceTransformerAPI
from shm_protocol.errors import ConfigError, ModelNotFound, NoRingAvailable, SidecarUnavailable
from shm_protocol.layout import ModelKind
from shm_protocol.tokenizer import WorkerTokenizer, check_texts


class LocalEmbedder:
    """A SentenceTransformer in this process, with the client's interface."""

    def __init__(self, settings: Settings):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)  # a worker shares the cores with its siblings
        # The default embedding model (the first of SHM_EMBED_MODELS that embeds); rerankers stay in the sidecar.
        spec = next((m for m in model_files.model_specs(settings) if m.kind == ModelKind.EMBED), None)
        if spec is None:
            raise ConfigError("no embedding model to fall back on: every model of SHM_EMBED_MODELS reranks")
        path = spec.path
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.name = spec.name
        self.tok = WorkerTokenizer(str(model_files.tokenizer_file(path)), int(self.model.max_seq_length))
        self.options = model_files.text_options(path, spec.matryoshka)
        self.settings = settings
        self.lock = threading.Lock()
        logger.info("local model {} loaded in the worker", self.name)

    def info(self) -> dict:
        dim, limit = int(self.model.get_embedding_dimension()), int(self.model.max_seq_length)
        return {"model": self.name, "dimension": dim, "max_seq_length": limit, "device": "cpu (local)",
                "dtype": "float32",
                "models": [{"name": self.name, "kind": "embed", "dimension": dim, "max_seq_length": limit,
                            "matryoshka": self.options.matryoshka, "index": 0, "dtype": "float32"}]}

    def embed_detailed(self, texts, *, truncate: bool | None = None, normalize: bool = False,
                       max_tokens: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                       dimensions: int | None = None, model: str | None = None,
                       truncation_direction: str | None = None, chunk: bool | None = None) -> EmbedResult:
        self._check_model(model)
        texts = check_texts(texts)
        dim = int(self.model.get_embedding_dimension())
        prompt = self.options.resolve_prompt(prompt, prompt_name)
        dims = self.options.check_dimensions(dimensions, dim, self.name)
        policy = long_inputs.resolve_policy(truncate, truncation_direction, chunk, self.settings.long_inputs)
        tok = self.tok.tokenize_request(texts, prompt=prompt, truncate=True, max_tokens=max_tokens, policy=policy)
        t0 = time.perf_counter_ns()
        with self.lock:
            if not texts:
                vecs = np.empty((0, dim), np.float32)
            elif policy in (long_inputs.TRUNCATE_LEFT, long_inputs.CHUNK):  # cut from ids, not from text
                vecs = self._encode_ids(tok.ids)
            else:  # prompt="": the prompt (or the model's default) is in the texts already
                vecs = self.model.encode(tok.texts, prompt="", convert_to_numpy=True)
        vecs = np.asarray(vecs, dtype=np.float32)
        if tok.owners is not None:
            vecs = long_inputs.combine_windows(vecs, tok.owners, tok.weights, len(texts))
        vecs = shape_vectors(vecs, dims, normalize)
        return EmbedResult(vecs, tok.token_counts, 0, time.perf_counter_ns() - t0, 0, tok.tokenize_ns, self.name)

    def _encode_ids(self, rows: list[list[int]]) -> np.ndarray:
        """The model's vectors of token ids as given (special tokens included)."""
        import torch

        width = max(len(row) for row in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        features = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}
        with torch.inference_mode():
            return self.model(features)["sentence_embedding"].float().numpy()

    def tokenize(self, texts, *, model: str | None = None, add_special_tokens: bool = True,
                 prompt: str | None = None, prompt_name: str | None = None, max_tokens: int | None = None) -> list:
        self._check_model(model)
        return tokens.tokenize_texts(self.tok, texts, prompt=self.options.resolve_prompt(prompt, prompt_name),
                                     add_special_tokens=add_special_tokens, max_tokens=max_tokens)

    def decode(self, ids, *, model: str | None = None, skip_special_tokens: bool = True) -> list[str]:
        self._check_model(model)
        return tokens.decode_ids(self.tok, ids, vocab_size=self.tok.vocab_size,
                                 skip_special_tokens=skip_special_tokens)

    def prompts(self, model: str | None = None) -> dict[str, str]:
        self._check_model(model)
        return dict(self.options.prompts)

    def _check_model(self, model: str | None) -> None:
        if model is not None and not model_files.name_matches(model, self.name):
            if not self.settings.use_ipc:  # this model is all there is: a 404, for good
                raise ModelNotFound(f"The model '{model}' does not exist here; this service serves '{self.name}'",
                                    requested=model, served=[self.name])
            # The sidecar may serve it once it is back: a 503 to retry, not a 404.
            raise SidecarUnavailable(f"the model {model!r} is served by the sidecar only, which is unavailable; "
                                     f"the local fallback serves {self.name!r}", reason="fallback")


class FallbackClient(SentenceTransformerAPI):
    """EmbeddingClient's interface, served by the sidecar or a local model.

    ``mode`` says which served the last call: "ipc" or "local"."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ipc = EmbeddingClient.connect(settings, lazy=True) if settings.use_ipc else None
        self._local: LocalEmbedder | None = None
        self._lock = threading.Lock()
        self.mode = "ipc" if self.ipc is not None else "local"

    @property
    def local(self) -> LocalEmbedder:
        with self._lock:
            if self._local is None:
                self._local = LocalEmbedder(self.settings)
            return self._local

    def _use_local(self, exc: Exception | None) -> bool:
        if self.ipc is None:
            return True
        if exc is not None and self.settings.fallback == "local":
            if self.mode != "local":
                logger.warning("sidecar unavailable ({}); embedding with a local model until it is back", exc)
            self.mode = "local"
            return True
        return False

    def _call(self, name: str, *args, **kwargs):
        if self.ipc is not None:
            try:
                out = getattr(self.ipc, name)(*args, **kwargs)
                if self.mode != "ipc":
                    logger.info("sidecar is back; embedding through it again")
                self.mode = "ipc"
                return out
            except (SidecarUnavailable, NoRingAvailable) as exc:
                if not self._use_local(exc):
                    raise
        return getattr(self.local, name)(*args, **kwargs)

    def embed_detailed(self, texts, *, truncate: bool | None = None, normalize: bool = False,
                       max_tokens: int | None = None, prompt: str | None = None, prompt_name: str | None = None,
                       dimensions: int | None = None, model: str | None = None,
                       truncation_direction: str | None = None, chunk: bool | None = None) -> EmbedResult:
        """EmbeddingClient.embed_detailed, through the sidecar or the local model."""
        return self._call("embed_detailed", texts, truncate=truncate, normalize=normalize, max_tokens=max_tokens,
                          prompt=prompt, prompt_name=prompt_name, dimensions=dimensions, model=model,
                          truncation_direction=truncation_direction, chunk=chunk)

    def embed(self, texts, *, truncate: bool | None = None, normalize: bool = False, prompt: str | None = None,
              prompt_name: str | None = None, dimensions: int | None = None, model: str | None = None,
              **options) -> np.ndarray:
        return self.embed_detailed(texts, truncate=truncate, normalize=normalize, prompt=prompt,
                                   prompt_name=prompt_name, dimensions=dimensions, model=model, **options).vectors

    def tokenize(self, texts, *, model: str | None = None, add_special_tokens: bool = True,
                 prompt: str | None = None, prompt_name: str | None = None, max_tokens: int | None = None) -> list:
        """EmbeddingClient.tokenize (the worker's tokenizer, no round trip)."""
        return self._call("tokenize", texts, model=model, add_special_tokens=add_special_tokens, prompt=prompt,
                          prompt_name=prompt_name, max_tokens=max_tokens)

    def decode(self, ids, *, model: str | None = None, skip_special_tokens: bool = True) -> list[str]:
        return self._call("decode", ids, model=model, skip_special_tokens=skip_special_tokens)

    def prompts(self, model: str | None = None) -> dict[str, str]:
        return self._call("prompts", model)

    def info(self) -> dict:
        return self._call("info")

    def rerank_detailed(self, query, documents, *, model: str | None = None, raw_scores: bool = False,
                        truncate: bool = True, max_tokens: int | None = None, prompt: str | None = None,
                        prompt_name: str | None = None):
        """EmbeddingClient.rerank_detailed: the sidecar's rerankers only (no local one)."""
        if self.ipc is None:  # permanent in this configuration: a 422, not a 503 to retry
            raise ModelNotFound("reranking needs the sidecar's cross-encoders, and IPC is off "
                                "(USE_IPC_EMBEDDING=false)", requested="", served=[])
        return self.ipc.rerank_detailed(query, documents, model=model, raw_scores=raw_scores, truncate=truncate,
                                        max_tokens=max_tokens, prompt=prompt, prompt_name=prompt_name)

    def rerank(self, query, documents, **options) -> np.ndarray:
        return self.rerank_detailed(query, documents, **options).scores

    def classify_detailed(self, inputs, *, model: str | None = None, raw_scores: bool = False,
                          truncate: bool = True, max_tokens: int | None = None):
        """EmbeddingClient.classify_detailed: the sidecar's classifiers only (no local one)."""
        if self.ipc is None:  # permanent in this configuration: a 422, not a 503 to retry
            raise ModelNotFound("classification needs the sidecar's classifiers, and IPC is off "
                                "(USE_IPC_EMBEDDING=false)", requested="", served=[])
        return self.ipc.classify_detailed(inputs, model=model, raw_scores=raw_scores, truncate=truncate,
                                          max_tokens=max_tokens)

    def classify(self, inputs, *, model: str | None = None, raw_scores: bool = False,
                 truncate: bool = True) -> list[list[dict]]:
        return self.classify_detailed(inputs, model=model, raw_scores=raw_scores, truncate=truncate).ranked()

    @property
    def dimension(self) -> int:
        return int(self.info()["dimension"])

    def stats(self):
        if self.ipc is None:
            raise SidecarUnavailable("IPC is off (USE_IPC_EMBEDDING=false)", reason="disabled")
        return self.ipc.stats()

    def publish_load(self, inflight: int, busy_ns: int, at_ns: int) -> None:
        """EmbeddingClient.publish_load, into the sidecar ring this process holds (if any)."""
        if self.ipc is not None:
            self.ipc.publish_load(inflight, busy_ns, at_ns)

    def close(self) -> None:
        if self.ipc is not None:
            self.ipc.close()


def make_client(settings: Settings):
    """The embedding client the settings ask for: the sidecar's, or one that
    falls back to a local model (USE_IPC_EMBEDDING=false or SHM_EMBED_FALLBACK=local)."""
    if not settings.use_ipc or settings.fallback == "local":
        return FallbackClient(settings)
    return EmbeddingClient.connect(settings, lazy=True)


_default: dict = {}
_default_lock = threading.RLock()


def get_embedding_client():
    """This process's shared client, made from the environment on first use."""
    with _default_lock:
        client = _default.get("client")
        if client is None:
            client = _default["client"] = make_client(Settings.from_env())
        return client


def get_embedding_model():
    """The original entry point: something with ``encode`` to embed with. The
    shared client when the sidecar answers; otherwise (as the original did
    when it could not connect) a client that embeds with a local model until
    the sidecar is back, instead of failing every later call."""
    with _default_lock:
        model = _default.get("model")
        if model is not None:
            return model
        model = get_embedding_client()  # one client, one ring, for both entry points
        if isinstance(model, EmbeddingClient):
            try:
                model.info()
            except (SidecarUnavailable, NoRingAvailable) as exc:
                logger.warning("embedding sidecar unavailable ({}); using a local model meanwhile", exc)
                model = FallbackClient(model.settings.replace(fallback="local"))
                model.mode = "local"  # until a call finds the sidecar back
        _default["model"] = model
        return model


def is_using_ipc_embedding() -> bool:
    """Whether the model of ``get_embedding_model()`` embeds through the sidecar now."""
    model = get_embedding_model()
    return isinstance(model, EmbeddingClient) or getattr(model, "mode", "local") == "ipc"


def generate_embeddings(texts, batch_size: int = 32) -> np.ndarray:
    """The original call: one float32 row per text, through the shared client."""
    return get_embedding_model().generate_embeddings(texts, batch_size)


def get_active_operations_count() -> int:
    """Requests the sidecar holds right now, host-wide (slots submitted or being embedded)."""
    client = get_embedding_client()
    ipc = client.ipc if isinstance(client, FallbackClient) else client
    if ipc is None:
        return 0
    return int(ipc.stats().busy_slots)
