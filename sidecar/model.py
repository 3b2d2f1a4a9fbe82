"""Loading the model once and running padded batches on CPU or CUDA.

CPU: numpy buffers preallocated once, viewed by torch without copies.
CUDA: page-locked (pinned) staging buffers, non-blocking copies on a
dedicated stream, results copied back into a pinned buffer that numpy reads.
The only copy on the way in is the one that pads ragged ids into a matrix.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from loguru import logger

from shm_protocol import model_files
from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError
from shm_protocol.layout import Activation, ModelKind

from .backend import ModelInfo, model_specs
from .errors import DeviceError, ModelLoadError

#: The kinds of model loaded as a CrossEncoder, which take (text, text) pairs.
PAIR_KINDS = (ModelKind.RERANK, ModelKind.CLASSIFY)
#: What a model's ``dim`` counts, for its log line.
UNITS = {ModelKind.EMBED: "dims", ModelKind.RERANK: "score", ModelKind.CLASSIFY: "labels"}


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"SHM_EMBED_DEVICE={requested} but torch sees no CUDA device")
    return requested


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: What SHM_EMBED_DTYPE=auto may pick on a CPU: "measure" when the CPU has
#: bfloat16 dot products (avx512_bf16) but no AMX tiles, where bf16 is not
#: certain to win: the model is timed both ways at load.
def choose_dtype(requested: str, device: str, flags: frozenset[str]) -> str:
    """The weights' dtype for ``requested`` (SHM_EMBED_DTYPE) on ``device``:
    ``auto`` is float16 on CUDA, bfloat16 on a CPU with AMX (all-MiniLM-L6-v2
    runs 2-3.9x faster there, minimum cosine 0.9999 against float32),
    "measure" on a CPU with avx512_bf16 only, float32 elsewhere. float16 on
    a CPU is refused: torch's CPU kernels for it are slower than float32."""
    if requested != "auto":
        if requested == "float16" and not device.startswith("cuda"):
            raise ConfigError("SHM_EMBED_DTYPE=float16 needs a CUDA device; on a CPU use bfloat16 or auto")
        return requested
    if device.startswith("cuda"):
        return "float16"
    if "amx_bf16" in flags:
        return "bfloat16"
    if "avx512_bf16" in flags:
        return "measure"
    return "float32"


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _activation(fn) -> Activation:
    """The Activation for a CrossEncoder's activation function (the scores
    are written raw; the reader applies it)."""
    import torch

    if fn is None or isinstance(fn, torch.nn.Identity):
        return Activation.IDENTITY
    if isinstance(fn, torch.nn.Sigmoid):
        return Activation.SIGMOID
    raise ModelLoadError(f"the cross-encoder's activation {fn!r} is not served (identity or sigmoid)")


class Embedder:
    """One loaded model (a SentenceTransformer, or a CrossEncoder for
    reranking) and the buffers its batches run through."""

    def __init__(self, settings: Settings, spec: model_files.ModelSpec | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch

        self.torch = torch
        spec = spec or model_specs(settings)[0]
        threads = settings.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        path = spec.path
        device = choose_device(settings.device)
        t0 = time.monotonic()
        try:
            if spec.kind in PAIR_KINDS:  # a classifier loads as a CrossEncoder of several labels
                from sentence_transformers import CrossEncoder

                model = CrossEncoder(str(path), device=device, local_files_only=True)
            else:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load {path}: {exc}") from exc
        try:
            dtype = choose_dtype(settings.dtype, device, cpu_flags() if device == "cpu" else frozenset())
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
        model.eval()
        self.model = model
        try:
            tokenizer_json = model_files.tokenizer_file(path)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
        transformer = model[0]
        hf_model = getattr(transformer, "auto_model", None) or model.transformers_model
        self.hf_model = hf_model  # the transformers model inside (its config names the attention kernel)
        vocab = hf_model.get_input_embeddings().num_embeddings
        tokenizer = getattr(model, "tokenizer", None)
        self._input_names = set(getattr(transformer, "model_input_names", None)
                                or getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
        if spec.kind == ModelKind.RERANK:
            if int(model.num_labels) != 1:
                raise ModelLoadError(f"{path}: a reranker gives one score per pair; this one gives "
                                     f"{model.num_labels} (num_labels)")
            self._output = "scores"
            dim = 1
            max_len = int(model.max_seq_length or model_files.max_seq_length(path))
            types = int(getattr(hf_model.config, "type_vocab_size", 0) or 0) \
                if "token_type_ids" in self._input_names else 0
            activation = _activation(model.activation_fn)
        elif spec.kind == ModelKind.CLASSIFY:
            try:
                labels = model_files.classifier_config(path)
            except ConfigError as exc:
                raise ModelLoadError(str(exc)) from None
            if int(model.num_labels) != len(labels.labels):
                raise ModelLoadError(f"{path}: the model gives {model.num_labels} scores, its config.json names "
                                     f"{len(labels.labels)} labels")
            self._output = "scores"
            dim = len(labels.labels)
            max_len = int(model.max_seq_length or model_files.max_seq_length(path))
            types = int(getattr(hf_model.config, "type_vocab_size", 0) or 0) \
                if "token_type_ids" in self._input_names else 0
            activation = labels.activation
        else:
            self._output = "sentence_embedding"
            dim = int(model.get_embedding_dimension())
            max_len = int(model.max_seq_length)
            types, activation = 0, Activation.IDENTITY
        self.info = ModelInfo(
            name=spec.name,
            path=str(path),
            tokenizer_path=str(tokenizer_json),
            dim=dim,
            max_seq_length=max_len,
            vocab_size=int(vocab),
            device=device,
            kind=spec.kind,
            type_vocab_size=types,
            activation=activation,
            matryoshka=spec.matryoshka or model_files.text_options(path).matryoshka,
            dtype="float32",
        )
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.uses_cpu = not self.is_cuda  # whether a model call keeps the CPU's cores busy
        self._capacity = max(settings.call_tokens, self.info.max_seq_length)
        self._max_texts = settings.max_batch_texts
        self._types_dirty = 0  # leading entries of the segment-id buffer a call of pairs set (others are 0)
        self._alloc_buffers()
        if dtype == "measure":
            dtype = self._faster_dtype()
        if dtype != "float32":
            self.model = model.to(getattr(torch, dtype))
            self.info = dataclasses.replace(self.info, dtype=dtype)
        #: Texts per model call at most: the scheduler cuts larger batches into calls of this many.
        self.call_rows = min(settings.call_rows or self._best_call_rows(), self._max_texts)
        logger.info(
            "loaded {} ({}, {} {}, max {} tokens) from {} on {} in {} in {:.1f}s with {} torch threads",
            spec.name, spec.kind.name.lower(), dim, UNITS[spec.kind],
            max_len, path, device, dtype, time.monotonic() - t0, threads,
        )

    def _best_call_rows(self, width: int = 32) -> int:
        """The fewest texts per call that reach 95% of the best texts/s, over
        calls of 1 to 128 texts of ``width`` tokens (best of 2 each, after a
        warm-up; about a second on a 2-core CPU). A CPU runs best at 16-32 and slower per text beyond; a GPU
        keeps gaining, and gets the largest call the budget allows."""
        width = min(width, self.info.max_seq_length)
        rates = {}
        self.embed([np.arange(1000, 1000 + width, dtype=np.int32) % self.info.vocab_size] * 8)  # warm-up
        for rows in (1, 4, 8, 16, 32, 64, 128):
            if rows > self._max_texts or rows * width > self._capacity:
                break
            seqs = [np.arange(1000, 1000 + width, dtype=np.int32) % self.info.vocab_size] * rows
            best = min(_timed(self.embed, seqs) for _ in range(2))
            rates[rows] = rows / best
        top = max(rates.values())
        pick = min(r for r, rate in rates.items() if rate >= 0.95 * top)
        if pick == max(rates):
            pick = self._max_texts  # still gaining at the largest measured: let the token budget decide
        logger.info("texts/s by texts per call ({} tokens each): {}; calls of at most {} texts", width,
                    ", ".join(f"{r}: {rate:.0f}" for r, rate in rates.items()), pick)
        return pick

    def _faster_dtype(self) -> str:
        """float32 or bfloat16, whichever runs a batch of 16 texts of 48
        tokens faster here (best of 3 each, after a warm-up): on a CPU with
        bfloat16 dot products but no AMX tiles either may win."""
        torch = self.torch
        seqs = [np.arange(1000, 1048, dtype=np.int32) for _ in range(16)]
        best = {}
        for name in ("float32", "bfloat16"):
            self.model = self.model.to(getattr(torch, name))
            self.embed(seqs)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                self.embed(seqs)
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
        self.model = self.model.to(torch.float32)
        pick = min(best, key=best.get)
        logger.info("dtype auto on a CPU with avx512_bf16 and no AMX: float32 {:.1f} ms, bfloat16 {:.1f} ms "
                    "for 16 x 48 tokens; serving {}", 1e3 * best["float32"], 1e3 * best["bfloat16"], pick)
        return pick

    def _alloc_buffers(self) -> None:
        torch = self.torch
        cap, dim = self._capacity, self.info.dim
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device=self.device)
            self._ids_host = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self._mask_host = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self._types_host = torch.zeros(cap, dtype=torch.int64, pin_memory=True)
            self._out_host = torch.empty((self._max_texts, dim), dtype=torch.float32, pin_memory=True)
            self._ids_np = self._ids_host.numpy()
            self._mask_np = self._mask_host.numpy()
            self._types_np = self._types_host.numpy()
            self._out_np = self._out_host.numpy()
            self._types_dev = torch.zeros(cap, dtype=torch.int64, device=self.device)
        else:
            self._ids_np = np.zeros(cap, dtype=np.int64)
            self._mask_np = np.zeros(cap, dtype=np.int64)
            self._types_np = np.zeros(cap, dtype=np.int64)

    @property
    def capacity_tokens(self) -> int:
        """Padded tokens one call may hold."""
        return self._capacity

    @property
    def max_texts(self) -> int:
        """Texts one call may hold."""
        return self._max_texts

    @property
    def takes_types(self) -> bool:
        """Whether the model takes segment ids (token_type_ids)."""
        return "token_type_ids" in self._input_names

    def forward(self, features: dict) -> object:
        """The model on a padded batch already on the device (``input_ids``,
        ``attention_mask`` and, where it takes them, ``token_type_ids``, each
        rows x width): a float32 tensor of one row per text, on the device.
        What :mod:`sidecar.cuda_graphs` captures."""
        out = self.model(features)[self._output]
        return out.float().reshape(features["input_ids"].shape[0], -1)

    def embed(self, seqs: list[np.ndarray], segments: list[int] | None = None) -> np.ndarray:
        """Vectors (float32, one row per sequence) of already-validated token
        id sequences; for a reranker, each row holds a pair's raw score, and
        ``segments[i]`` is where pair i's second segment starts (its tokens
        get segment id 1). The result is only valid until the next call."""
        torch = self.torch
        n_texts = len(seqs)
        width = max(len(seq) for seq in seqs)
        size = n_texts * width
        if size > self._capacity or n_texts > self._max_texts:
            raise ValueError(f"batch of {n_texts}x{width} over capacity {self._capacity} tokens / "
                             f"{self._max_texts} texts")
        ids = self._ids_np[:size].reshape(n_texts, width)
        mask = self._mask_np[:size].reshape(n_texts, width)
        ids.fill(0)
        mask.fill(0)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        takes_types = "token_type_ids" in self._input_names
        pairs = takes_types and segments is not None and self.info.type_vocab_size > 1
        if pairs:
            types = self._types_np[:size].reshape(n_texts, width)
            types.fill(0)
            for i, (seq, split) in enumerate(zip(seqs, segments)):
                if split:
                    types[i, split: len(seq)] = 1
            self._types_dirty = max(self._types_dirty, size)
        elif takes_types and self._types_dirty:  # zeros again where a call of pairs left ones
            self._types_np[: self._types_dirty].fill(0)
            self._types_dirty = 0
        with torch.inference_mode():
            if self.is_cuda:
                with torch.cuda.stream(self.stream):
                    features = {
                        "input_ids": self._ids_host[:size].view(n_texts, width).to(self.device, non_blocking=True),
                        "attention_mask": self._mask_host[:size].view(n_texts, width).to(self.device,
                                                                                         non_blocking=True),
                    }
                    if pairs:
                        features["token_type_ids"] = self._types_host[:size].view(n_texts, width).to(
                            self.device, non_blocking=True)
                    elif takes_types:
                        features["token_type_ids"] = self._types_dev[:size].view(n_texts, width)
                    out = self.model(features)[self._output]
                    self._out_host[:n_texts].copy_(out.float().reshape(n_texts, -1), non_blocking=True)
                self.stream.synchronize()
                return self._out_np[:n_texts]
            features = {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(mask),
            }
            if takes_types:
                features["token_type_ids"] = torch.from_numpy(self._types_np[:size].reshape(n_texts, width))
            out = self.model(features)[self._output]
            return out.float().reshape(n_texts, -1).numpy()
