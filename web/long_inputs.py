"""The request fields that say what becomes of an input over the model's
limit (shm_protocol.long_inputs): TEI's ``truncate`` and
``truncation_direction``, and ``chunk``. Fields left out follow
SHM_EMBED_LONG_INPUTS."""

from __future__ import annotations

from shm_protocol.long_inputs import DIRECTIONS

from .errors import unprocessable
from .schema import Boolean, Field, String

LONG_INPUT_FIELDS = (
    Field("truncate", Boolean(), "Cut an input longer than the model's limit (true), or refuse it with a 413 "
          "(false); left out: SHM_EMBED_LONG_INPUTS decides (default: cut)."),
    Field("truncation_direction", String(enum=DIRECTIONS, ignore_case=True),
          "Which end a cut input loses: right (its end) or left (its start, the prompt kept); any case."),
    Field("chunk", Boolean(), "Embed a long input in windows of the model's limit, each with the special "
          "tokens, and average the windows' vectors weighted by their tokens (excludes truncate=true)."),
)


def long_input_options(args: dict) -> dict:
    """``truncate``, ``truncation_direction`` and ``chunk`` of a body checked
    with LONG_INPUT_FIELDS (None where absent), for the client's embed call."""
    if args["truncate"] and args["chunk"]:
        raise unprocessable("'truncate' and 'chunk' exclude each other: a long input is cut or chunked")
    return {"truncate": args["truncate"], "chunk": args["chunk"],
            "truncation_direction": args["truncation_direction"]}
