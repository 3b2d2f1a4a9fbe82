"""POST /v2/embed, in Cohere's v2 shape: {"texts", "model", "input_type",
"embedding_types", "truncate", "output_dimension"} ->
{"id", "embeddings": {type: [...]}, "texts", "meta", "response_type"}.

Vectors are always unit length (as Cohere's are), cut to
``output_dimension`` first when asked (Matryoshka models only) and
normalized again; the int8, uint8, binary, ubinary and base64 types are
made from them by shm_protocol.quantize. ``input_type`` picks the model's
prompt (shm_protocol.input_types); ``truncate`` NONE refuses a text over
the model's limit (413), START cuts its start, END (the default) its end.
"""

from __future__ import annotations

import uuid

import falcon

from shm_protocol.errors import InvalidInput
from shm_protocol.input_types import INPUT_TYPES, prompt_name_for
from shm_protocol.quantize import EMBEDDING_TYPES, check_embedding_types, quantize_all

from .errors import unprocessable

#: Cohere's truncate values and the client's long-input options for each.
TRUNCATE_MODES = {
    "NONE": {"truncate": False},
    "START": {"truncate": True, "truncation_direction": "left"},
    "END": {"truncate": True, "truncation_direction": "right"},
}


def _choice(doc: dict, key: str, accepted, default=None):
    value = doc.get(key, default)
    if value is not None and value not in accepted:
        raise unprocessable(f"'{key}' is {value!r}; accepted values: {', '.join(accepted)}")
    return value


class CohereEmbed:
    def __init__(self, ctx):
        self.ctx = ctx

    def on_post(self, req, resp):
        doc = self.ctx.read_json(req)
        if "texts" not in doc:
            raise unprocessable("'texts' is required (a list of strings; images are not served)")
        texts, single = self.ctx.texts(doc["texts"], "texts")
        if single:
            raise unprocessable("'texts' must be a list of strings")
        model = doc.get("model")
        if model is not None and not isinstance(model, str):
            raise unprocessable("'model' must be a string")
        input_type = _choice(doc, "input_type", tuple(INPUT_TYPES))
        try:
            kinds = check_embedding_types(doc.get("embedding_types", ["float"]))
        except InvalidInput as exc:
            raise unprocessable(str(exc)) from None
        truncate = doc.get("truncate", "END")
        mode = TRUNCATE_MODES.get(truncate.upper() if isinstance(truncate, str) else None)
        if mode is None:
            raise unprocessable(f"'truncate' is {truncate!r}; accepted values: {', '.join(TRUNCATE_MODES)}")
        dims = doc.get("output_dimension")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise unprocessable("'output_dimension' must be a positive integer")
        prompt_name = prompt_name_for(input_type, self.ctx.client.prompts(model))
        res = self.ctx.embed(texts, normalize=True, prompt_name=prompt_name, dimensions=dims, model=model, **mode)
        n = res.total_tokens
        resp.media = {
            "id": uuid.uuid4().hex,
            "embeddings": quantize_all(res.vectors, [k for k in EMBEDDING_TYPES if k in kinds]),
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": n},
                     "tokens": {"input_tokens": n}},
            "response_type": "embeddings_by_type",
        }


def add_routes(app: falcon.App, ctx) -> None:
    app.add_route("/v2/embed", CohereEmbed(ctx))
