"""What becomes of a text longer than the model reads at once: cut at its
end, cut at its start, refused, or embedded in windows whose vectors are
averaged. One choice per request; SHM_EMBED_LONG_INPUTS is the default.

Chunked processing (as vLLM's ``enable_chunked_processing`` does it): a
text's ids without special tokens (its prompt's included: the prompt is in
the first window only) are cut into windows of as many content tokens as
the model's limit leaves beside its special tokens; each window gets the
special tokens again and goes to the sidecar as a text of its own, in the
same request (so in the same batches as the others). The text's vector is
the mean of its windows' vectors weighted by each window's content tokens,
normalized afterwards when the request asks for it (and cut to
``dimensions`` before that). Pure functions, tested without processes.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInput

#: right-truncation, left-truncation, RequestTooLarge, windows.
TRUNCATE, TRUNCATE_LEFT, REFUSE, CHUNK = "truncate", "truncate_left", "refuse", "chunk"
POLICIES = (TRUNCATE, TRUNCATE_LEFT, REFUSE, CHUNK)
DIRECTIONS = ("right", "left")


def resolve_policy(truncate: bool | None, truncation_direction: str | None, chunk: bool | None,
                   default: str) -> str:
    """The policy a request's options name (TEI's ``truncate`` and
    ``truncation_direction``, and ``chunk``), ``default`` for what they leave
    open (``chunk=False`` alone with a default of CHUNK: TRUNCATE).
    ``chunk=True`` with ``truncate=True`` contradict: InvalidInput."""
    if truncation_direction is not None:
        if not isinstance(truncation_direction, str) or truncation_direction.lower() not in DIRECTIONS:
            raise InvalidInput(f"truncation_direction={truncation_direction!r}: accepted values: right, left")
        truncation_direction = truncation_direction.lower()
    for name, value in (("truncate", truncate), ("chunk", chunk)):
        if value is not None and not isinstance(value, bool):
            raise InvalidInput(f"{name}={value!r}: must be true or false")
    if chunk:
        if truncate:
            raise InvalidInput("truncate=true and chunk=true exclude each other: a long input is cut or chunked")
        return CHUNK
    if truncate is False:
        return REFUSE
    if truncate is None and truncation_direction is None and default in POLICIES:
        # chunk=false is heard: a default of chunking then cuts at the end.
        return TRUNCATE if chunk is False and default == CHUNK else default
    return TRUNCATE_LEFT if truncation_direction == "left" else TRUNCATE


def windows(content: list[int], room: int) -> list[list[int]]:
    """``content`` cut into runs of ``room`` ids (the last one shorter); one
    empty run for an empty text."""
    if room < 1:
        raise InvalidInput("the model's special tokens leave no room for a text")
    return [content[i:i + room] for i in range(0, len(content), room)] or [[]]


def combine_windows(vectors: np.ndarray, owners: np.ndarray, weights: np.ndarray, n_texts: int) -> np.ndarray:
    """Each text's vector from its windows' rows of ``vectors``: the mean
    weighted by ``weights`` (content tokens per window; a window of no
    content counts as one, so an empty text keeps its one row) over the rows
    whose ``owners`` entry is the text's index. float32 (n_texts, dim)."""
    weights = np.maximum(np.asarray(weights, dtype=np.float64), 1.0)
    summed = np.zeros((n_texts, vectors.shape[1]), dtype=np.float64)
    np.add.at(summed, owners, vectors.astype(np.float64) * weights[:, None])
    totals = np.bincount(owners, weights=weights, minlength=n_texts)
    return (summed / totals[:, None]).astype(np.float32)
