"""What the sidecar's scheduler needs of a served model, declared once: the
torch model (:class:`sidecar.model.Embedder`) and the synthetic backend
(:class:`sidecar.synthetic.SyntheticEmbedder`) implement :class:`Backend`;
:mod:`sidecar.loader` picks which."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from shm_protocol import model_files
from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError
from shm_protocol.layout import Activation, ModelEntry, ModelFlag, ModelKind

from .errors import ModelLoadError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    tokenizer_path: str
    dim: int  # vector size; a reranker's scores per pair
    max_seq_length: int
    vocab_size: int
    device: str
    kind: ModelKind = ModelKind.EMBED
    type_vocab_size: int = 0  # segment ids a reranker takes (0: pairs go without them)
    activation: Activation = Activation.IDENTITY
    matryoshka: bool = False
    dtype: str = "float32"  # the weights' dtype on the device

    def entry(self, index: int) -> ModelEntry:
        """This model's entry in the header's model table."""
        return ModelEntry(index, self.name, self.kind, self.dim, self.max_seq_length, self.vocab_size,
                          self.type_vocab_size, self.activation,
                          ModelFlag.MATRYOSHKA if self.matryoshka else ModelFlag(0), self.tokenizer_path,
                          self.dtype)


@runtime_checkable
class Backend(Protocol):
    """One loaded model as the scheduler uses it."""

    info: ModelInfo
    #: Whether a call keeps the CPU's cores busy (torch on the CPU); False
    #: where it leaves them free (CUDA, synthetic): waiters may then spin.
    uses_cpu: bool
    #: Texts per model call at most (measured at load, or SHM_EMBED_CALL_ROWS).
    call_rows: int

    @property
    def capacity_tokens(self) -> int:
        """Padded tokens one call may hold."""
        ...

    def embed(self, seqs: list[np.ndarray], segments: list[int] | None = None) -> np.ndarray:
        """Vectors (or a reranker's raw scores) of validated id sequences, one row each."""
        ...


def model_specs(settings: Settings) -> list[model_files.ModelSpec]:
    try:
        return model_files.model_specs(settings)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
