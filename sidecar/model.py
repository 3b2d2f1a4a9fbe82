"""Loading the model once and running padded batches on CPU or CUDA.

CPU: numpy buffers preallocated once, viewed by torch without copies.
CUDA: page-locked (pinned) staging buffers, non-blocking copies on a
dedicated stream, results copied back into a pinned buffer that numpy reads.
The only copy on the way in is the one that pads ragged ids into a matrix.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from shm_protocol import model_files
from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError

from .errors import DeviceError, ModelLoadError


def resolve_model_path(settings: Settings) -> Path:
    try:
        return model_files.resolve_model_path(settings.model)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"SHM_EMBED_DEVICE={requested} but torch sees no CUDA device")
    return requested


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    tokenizer_path: str
    dim: int
    max_seq_length: int
    vocab_size: int
    device: str


class Embedder:
    """One loaded model and the buffers its batches run through."""

    def __init__(self, settings: Settings):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        self.torch = torch
        threads = settings.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        path = resolve_model_path(settings)
        device = choose_device(settings.device)
        t0 = time.monotonic()
        try:
            model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load {path}: {exc}") from exc
        if device.startswith("cuda") and settings.dtype != "float32":
            model = model.to(getattr(torch, settings.dtype))
        model.eval()
        self.model = model
        try:
            tokenizer_json = model_files.tokenizer_file(path)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
        transformer = model[0]
        vocab = transformer.auto_model.get_input_embeddings().num_embeddings
        self.info = ModelInfo(
            name=model_files.model_name(path),
            path=str(path),
            tokenizer_path=str(tokenizer_json),
            dim=int(model.get_embedding_dimension()),
            max_seq_length=int(model.max_seq_length),
            vocab_size=int(vocab),
            device=device,
        )
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.uses_cpu = not self.is_cuda  # whether a model call keeps the CPU's cores busy
        self._input_names = set(getattr(transformer, "model_input_names", None) or ["input_ids", "attention_mask"])
        self._capacity = max(settings.max_batch_tokens, self.info.max_seq_length)
        self._max_texts = settings.max_batch_texts
        self._alloc_buffers()
        logger.info(
            "loaded {} ({} dims, max {} tokens) on {} in {:.1f}s with {} torch threads",
            self.info.name, self.info.dim, self.info.max_seq_length, device, time.monotonic() - t0, threads,
        )

    def _alloc_buffers(self) -> None:
        torch = self.torch
        cap, dim = self._capacity, self.info.dim
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device=self.device)
            self._ids_host = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self._mask_host = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self._out_host = torch.empty((self._max_texts, dim), dtype=torch.float32, pin_memory=True)
            self._ids_np = self._ids_host.numpy()
            self._mask_np = self._mask_host.numpy()
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

    def embed(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Vectors (float32, one row per sequence) of already-validated token
        id sequences. The result is only valid until the next call."""
        torch = self.torch
        n = len(seqs)
        width = max(len(s) for s in seqs)
        size = n * width
        if size > self._capacity or n > self._max_texts:
            raise ValueError(f"batch of {n}x{width} over capacity {self._capacity} tokens / {self._max_texts} texts")
        ids = self._ids_np[:size].reshape(n, width)
        mask = self._mask_np[:size].reshape(n, width)
        ids.fill(0)
        mask.fill(0)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        with torch.inference_mode():
            if self.is_cuda:
                with torch.cuda.stream(self.stream):
                    features = {
                        "input_ids": self._ids_host[:size].view(n, width).to(self.device, non_blocking=True),
                        "attention_mask": self._mask_host[:size].view(n, width).to(self.device, non_blocking=True),
                    }
                    if "token_type_ids" in self._input_names:
                        features["token_type_ids"] = self._types_dev[:size].view(n, width)
                    emb = self.model(features)["sentence_embedding"]
                    self._out_host[:n].copy_(emb.float(), non_blocking=True)
                self.stream.synchronize()
                return self._out_np[:n]
            features = {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(mask),
            }
            if "token_type_ids" in self._input_names:
                features["token_type_ids"] = torch.from_numpy(self._types_np[:size].reshape(n, width))
            emb = self.model(features)["sentence_embedding"]
            return emb.float().numpy()


