"""POST /tokenize and POST /decode, in text-embeddings-inference's shape,
answered from the worker's own copy of the model's tokenizer (no round trip
to the sidecar; see shm_protocol.tokens)."""

from __future__ import annotations

import falcon

from .errors import unprocessable


def _flag(doc: dict, key: str, default: bool) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise unprocessable(f"'{key}' must be true or false")
    return value


def _optional_string(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise unprocessable(f"'{key}' must be a string")
    return value


class Tokenize:
    """POST /tokenize: {"inputs": str | [str], "add_special_tokens": bool (true),
    "prompt_name": str, "model": str} -> one list of tokens per input, each
    {"id", "text", "special", "start", "stop"} (character offsets into the
    text the model reads, its prompt included; null for special tokens).
    Not truncated; more than SHM_EMBED_MAX_REQUEST_TOKENS tokens in all is a 413."""

    def __init__(self, ctx):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc = self.ctx.read_json(req)
        if "inputs" not in doc:
            raise unprocessable("'inputs' is required")
        texts, _ = self.ctx.texts(doc["inputs"], "inputs")
        tokenized = self.ctx.client.tokenize(
            texts, model=_optional_string(doc, "model"), prompt_name=_optional_string(doc, "prompt_name"),
            add_special_tokens=_flag(doc, "add_special_tokens", True),
            max_tokens=self.ctx.settings.max_request_tokens)  # 413 above
        resp.media = [[token.as_dict() for token in t.tokens] for t in tokenized]


class Decode:
    """POST /decode: {"ids": [int] | [[int]], "skip_special_tokens": bool (true),
    "model": str} -> one string per list of ids. An id below 0 or at or past
    the vocabulary's size is a 422 naming it."""

    def __init__(self, ctx):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc = self.ctx.read_json(req)
        if "ids" not in doc:
            raise unprocessable("'ids' is required")
        resp.media = self.ctx.client.decode(doc["ids"], model=_optional_string(doc, "model"),
                                            skip_special_tokens=_flag(doc, "skip_special_tokens", True))


def add_routes(app: falcon.App, ctx) -> None:
    app.add_route("/tokenize", Tokenize(ctx))
    app.add_route("/decode", Decode(ctx))
