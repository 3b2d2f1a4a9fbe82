"""The SentenceTransformer drop-in: ``encode`` and the original system's
``generate_embeddings`` over any client's ``embed``, so a client goes
wherever a model object was passed around."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidInput


class SentenceTransformerAPI:
    """``SentenceTransformer.encode`` and the original system's
    ``generate_embeddings`` over any ``embed(texts, normalize=...)``, so a
    client is a drop-in wherever a model object was passed around."""

    def embed(self, texts, *, truncate: bool = True, normalize: bool = False, prompt: str | None = None,
              prompt_name: str | None = None, dimensions: int | None = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    @property
    def dimension(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def generate_embeddings(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """The original API: a float32 matrix, one row per text. ``batch_size``
        is accepted and ignored (the sidecar batches across workers)."""
        return self.embed(list(texts))

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_dim: int | None = None,
        **kwargs,
    ):
        """Drop-in for ``SentenceTransformer.encode``: a string gives one
        vector, a list gives a matrix; ``prompt``, ``prompt_name`` (and the
        model's default prompt) and ``truncate_dim`` as it applies them.
        ``batch_size`` and ``show_progress_bar`` are accepted and ignored (the
        sidecar batches across workers); any other argument is refused."""
        if kwargs:
            raise InvalidInput(f"encode() arguments not served by the sidecar: {', '.join(sorted(kwargs))}")
        if output_value not in (None, "sentence_embedding"):
            raise InvalidInput(f"output_value={output_value!r} is not served by the sidecar")
        if precision != "float32":
            raise InvalidInput(f"precision={precision!r}: only float32 is served")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        vecs = self.embed(texts, normalize=normalize_embeddings, prompt=prompt, prompt_name=prompt_name,
                          dimensions=truncate_dim)
        if convert_to_tensor:
            import torch  # only when the caller asked for tensors

            t = torch.from_numpy(vecs)
            if device is not None:
                t = t.to(device)
            return t[0] if single else t
        if not convert_to_numpy:
            import torch

            rows = [torch.from_numpy(v) for v in vecs]
            return rows[0] if single else rows
        return vecs[0] if single else vecs

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    get_embedding_dimension = get_sentence_embedding_dimension
