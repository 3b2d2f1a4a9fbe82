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

from shm_protocol.errors import InvalidInput
from shm_protocol.input_types import INPUT_TYPES, prompt_name_for
from shm_protocol.quantize import EMBEDDING_TYPES, check_embedding_types, quantize_all

from .embeddings import MODEL
from .errors import unprocessable
from .schema import STRING, Body, Field, Integer, Operation, Passed, Reply, String, Texts, array, obj

#: Cohere's truncate values and the client's long-input options for each.
TRUNCATE_MODES = {
    "NONE": {"truncate": False},
    "START": {"truncate": True, "truncation_direction": "left"},
    "END": {"truncate": True, "truncation_direction": "right"},
}

COHERE_EMBED = Operation(
    summary="Embed texts (Cohere's v2 embed API), as floats or quantized",
    tag="embeddings",
    description="Unit-length vectors, in input order, in every asked type: float, int8 and uint8 (the fixed "
                "[-1, 1] range: see docs/long-inputs-and-quantization.md), binary and ubinary (sign bits, "
                "packed as sentence-transformers' quantize_embeddings), base64 (little-endian float32).",
    body=Body(
        (Field("texts", Texts(list_only=True), "The texts to embed (images are not served).", required=True),
         MODEL,
         Field("input_type", String(enum=tuple(INPUT_TYPES)), "What the texts are for; picks the model's prompt "
               "of that purpose where it has one, else the texts are embedded as they are."),
         Field("embedding_types", Passed(array({"enum": list(EMBEDDING_TYPES)}, minItems=1)),
               "The types to answer with.", default=["float"]),
         Field("truncate", String(enum=tuple(TRUNCATE_MODES), ignore_case=True),
               "A text over the model's limit: END cuts its end, START its start, NONE refuses it (413); any case.",
               default="END"),
         Field("output_dimension", Integer(minimum=1), "Cut each vector to this many dimensions (Matryoshka "
               "models only), then make it unit length again.")),
        example={"texts": ["shared memory is fast"], "input_type": "search_query",
                 "embedding_types": ["float", "int8", "binary"]},
    ),
    replies=(Reply("The vectors by type, the texts and the tokens billed.", obj({
        "id": STRING, "embeddings": obj({}, required=(), additionalProperties=array({})),
        "texts": array(STRING), "meta": obj({}, required=(), additionalProperties=True),
        "response_type": {"const": "embeddings_by_type"}})),),
    errors=(404, 429, 503),
)


class CohereEmbed:
    def __init__(self, ctx):
        self.ctx = ctx

    @COHERE_EMBED
    def on_post(self, req, resp):
        args = COHERE_EMBED.body.read(self.ctx, req)
        try:
            kinds = check_embedding_types(args["embedding_types"])
        except InvalidInput as exc:
            raise unprocessable(str(exc)) from None
        model, texts = args["model"], args["texts"]
        prompt_name = prompt_name_for(args["input_type"], self.ctx.client.prompts(model))
        if args["output_dimension"] is not None:
            self._check_output_dimension(args["output_dimension"], model)
        res = self.ctx.embed(texts, normalize=True, prompt_name=prompt_name, dimensions=args["output_dimension"],
                             model=model, **TRUNCATE_MODES[args["truncate"]])
        input_tokens = res.total_tokens
        resp.media = {
            "id": uuid.uuid4().hex,
            "embeddings": quantize_all(res.vectors, [k for k in EMBEDDING_TYPES if k in kinds]),
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": input_tokens},
                     "tokens": {"input_tokens": input_tokens}},
            "response_type": "embeddings_by_type",
        }

    def _check_output_dimension(self, wanted: int, model: str | None) -> None:
        """A 422 naming ``output_dimension`` (the client's check names its
        own keyword, ``dimensions``) unless the model can give ``wanted``;
        an unknown model is left to the embed call (404)."""
        cards = [m for m in self.ctx.client.info()["models"] if m["kind"] == "embed"]
        card = next((m for m in cards if m["name"] == model), None) if model is not None else cards[0]
        if card is None:
            return
        dim = card["dimension"]
        if wanted > dim:
            raise unprocessable(f"'output_dimension' is {wanted}; {card['name']} gives 1 to {dim}")
        if wanted < dim and not card["matryoshka"]:
            raise unprocessable(f"'output_dimension' is {wanted}, but {card['name']} gives {dim} dimensions and is "
                                f"not trained for truncation (Matryoshka): leave it out, or send {dim}")


def add_routes(routes, ctx) -> None:
    """Add /v2/embed to ``routes`` (web.openapi.RouteTable)."""
    routes.add("/v2/embed", CohereEmbed(ctx))
