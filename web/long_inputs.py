"""The request fields that say what becomes of an input over the model's
limit (shm_protocol.long_inputs): TEI's ``truncate`` and
``truncation_direction``, and ``chunk``. Fields left out follow
SHM_EMBED_LONG_INPUTS."""

from __future__ import annotations

from shm_protocol.long_inputs import DIRECTIONS

from .errors import unprocessable


def long_input_options(doc: dict) -> dict:
    """``truncate``, ``truncation_direction`` and ``chunk`` of ``doc``,
    type-checked (None where absent), for the client's embed call."""
    out = {}
    for key in ("truncate", "chunk"):
        value = doc.get(key)
        if value is not None and not isinstance(value, bool):
            raise unprocessable(f"'{key}' must be true or false")
        out[key] = value
    direction = doc.get("truncation_direction")
    if direction is not None:
        if not isinstance(direction, str) or direction.lower() not in DIRECTIONS:
            raise unprocessable(f"'truncation_direction' must be one of: {', '.join(DIRECTIONS)} "
                                "(Right and Left are taken too)")
        direction = direction.lower()
    out["truncation_direction"] = direction
    if out["truncate"] and out["chunk"]:
        raise unprocessable("'truncate' and 'chunk' exclude each other: a long input is cut or chunked")
    return out
