"""Embedding types smaller than float32, as Cohere's ``/v2/embed`` returns
them (``embedding_types``): float, int8, uint8, binary, ubinary, base64.

- ``float``: the float32 vector as it is.
- ``base64``: the float32 vector's little-endian bytes in base64, one
  string per vector (what OpenAI's ``encoding_format="base64"`` and Cohere
  send): a quarter of the JSON of the numbers, read back exactly with
  ``np.frombuffer(base64.b64decode(s), "<f4")``.
- ``binary`` and ``ubinary``: one bit per dimension (1 where the value is
  above 0), packed 8 to a byte, most significant bit first; ``ubinary`` is
  the byte as uint8, ``binary`` the byte minus 128 as int8. Both are exactly
  sentence-transformers' ``quantize_embeddings(precision="binary"/"ubinary")``.
  Compare them by Hamming distance.
- ``int8`` and ``uint8``: one byte per dimension over a FIXED range,
  [-1, 1], which holds every component of a unit vector:
  ``int8 = round(x * 127)`` (-127..127) and ``uint8 = round((x + 1) * 127.5)``
  (0..255); :func:`dequantize` inverts them. The vectors must be unit
  length, which ``/v2/embed`` always makes them.

Why a fixed range rather than per-dimension ranges calibrated on the model's
vectors (sentence-transformers' ``calibration_embeddings``): the codes of a
text are then the same on every worker, host and restart, and whatever
model version or calibration set served it, so codes stored in an index
yesterday stay comparable with today's; nothing has to be embedded at
start-up, kept per model and per output dimension, or published to clients
for dequantization. It costs resolution: the bundled model's 384-dimensional
unit vectors have components within +-0.19, so 46 of the 255 levels are
used. That still keeps the cosine of the dequantized vector with the float
one at 0.9989 or more (six varied texts of the bundled model; the tests ask
for 0.99). A per-dimension range calibrated on the model's vectors would
use every level, at the price of the state described above.
"""

from __future__ import annotations

import base64

import numpy as np

from .errors import InvalidInput

#: Every embedding type, in the order a response lists them.
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")

#: Codes of the fixed [-1, 1] range: int8 is x * INT8_SCALE, uint8 is (x + 1) * UINT8_SCALE.
INT8_SCALE = 127.0
UINT8_SCALE = 127.5


def check_embedding_types(value, field: str = "embedding_types") -> list[str]:
    """``value`` as a list of distinct embedding types, or InvalidInput naming
    ``field`` and the accepted values."""
    accepted = ", ".join(EMBEDDING_TYPES)
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"'{field}' must be a non-empty list of: {accepted}")
    for i, kind in enumerate(value):
        if kind not in EMBEDDING_TYPES:
            raise InvalidInput(f"'{field}[{i}]' is {kind!r}; accepted values: {accepted}")
    return list(dict.fromkeys(value))


def quantize(vectors: np.ndarray, kind: str):
    """``vectors`` (float32, one row per text, unit length for int8 and
    uint8) as embedding type ``kind``: an array with one row per text, or
    for base64 a list of strings."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if kind == "float":
        return vectors
    if kind == "int8":
        return np.clip(np.rint(vectors * INT8_SCALE), -127, 127).astype(np.int8)
    if kind == "uint8":
        return np.clip(np.rint((vectors + 1.0) * UINT8_SCALE), 0, 255).astype(np.uint8)
    if kind == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    if kind == "binary":
        return (np.packbits(vectors > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if kind == "base64":
        little = vectors.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    raise InvalidInput(f"unknown embedding type {kind!r}; accepted values: {', '.join(EMBEDDING_TYPES)}")


def dequantize(codes: np.ndarray, kind: str) -> np.ndarray:
    """The float32 vectors that int8 or uint8 ``codes`` stand for (the
    middle of each code's interval of the fixed range)."""
    codes = np.asarray(codes)
    if kind == "int8":
        return codes.astype(np.float32) / np.float32(INT8_SCALE)
    if kind == "uint8":
        return codes.astype(np.float32) / np.float32(UINT8_SCALE) - np.float32(1.0)
    raise InvalidInput(f"only int8 and uint8 codes are dequantized, not {kind!r}")


def quantize_all(vectors: np.ndarray, kinds: list[str]) -> dict:
    """Each embedding type of ``kinds`` of ``vectors``, by type."""
    return {kind: quantize(vectors, kind) for kind in kinds}
