"""GET /v1/models and /v1/models/{model_id}: the served models, in OpenAI's shape."""

from __future__ import annotations

from shm_protocol.model_files import named, served_models

from . import errors
from .schema import INTEGER, STRING, Operation, Reply, array, obj

MODEL_CARD = obj({"id": STRING, "object": {"const": "model"}, "created": INTEGER, "owned_by": STRING,
                  "kind": {"enum": ["embed", "rerank", "classify"]}, "dimension": INTEGER,
                  "max_tokens": {"type": ["integer", "null"]}})

LIST_MODELS = Operation(
    summary="List the served models (the default embedding model first)",
    tag="models",
    replies=(Reply("One card per served model.", obj({"object": {"const": "list"}, "data": array(MODEL_CARD)})),),
    errors=(503,),
)

GET_MODEL = Operation(
    summary="One served model's card",
    tag="models",
    params={"model_id": ("A served model's name, or a hub id ending in it (org/name).", "all-MiniLM-L6-v2")},
    replies=(Reply("The model's card.", MODEL_CARD),),
    errors=(404, 503),
)


class Models:
    """One card per served model; ``on_get_item`` serves /v1/models/{model_id}."""

    def __init__(self, ctx):
        self.ctx = ctx

    def _cards(self) -> list[dict]:
        return [{"id": m["name"], "object": "model", "created": int(self.ctx.started), "owned_by": "shm-embed",
                 "kind": m["kind"], "dimension": m["dimension"], "max_tokens": m["max_seq_length"]}
                for m in served_models(self.ctx.client.info())]

    @LIST_MODELS
    def on_get(self, req, resp):
        resp.media = {"object": "list", "data": self._cards()}

    @GET_MODEL
    def on_get_item(self, req, resp, model_id: str):
        cards = self._cards()
        card = named(cards, model_id, lambda c: c["id"])
        if card is None:
            raise errors.model_not_found(model_id, [c["id"] for c in cards])
        resp.media = card
