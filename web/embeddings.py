"""Embedding resources: POST /v1/embeddings (OpenAI's shape) and POST /embed (TEI's)."""

from __future__ import annotations

import base64

from .long_inputs import LONG_INPUT_FIELDS, long_input_options
from .schema import (
    INTEGER,
    MAX_PROMPT_CHARS,
    NUMBER,
    STRING,
    Body,
    Boolean,
    Field,
    Integer,
    Operation,
    Reply,
    String,
    Texts,
    array,
    obj,
)

#: Fields every embedding route takes besides its texts.
MODEL = Field("model", String(), "A served model's name (GET /v1/models); default: the sidecar's first "
              "embedding model.")
PROMPT_FIELDS = (
    Field("prompt", String(max_length=MAX_PROMPT_CHARS), "Text put before every input (e.g. 'query: ').",),
    Field("prompt_name", String(), "The name of one of the model's configured prompts (e.g. 'query')."),
)
TEXT_OPTIONS = (
    *PROMPT_FIELDS,
    Field("dimensions", Integer(minimum=1), "Cut each vector to this many dimensions (a Matryoshka model's, "
          "or the model's own size); the cut vectors are made unit length again."),
    MODEL,
)
#: Where an embedding goes wrong besides the body: an unknown model, the rings full, no sidecar.
EMBED_ERRORS = (404, 429, 503)

OPENAI_EMBEDDINGS = Operation(
    summary="Embed texts (OpenAI's embeddings API)",
    tag="embeddings",
    description="As OpenAI's POST /v1/embeddings, so its clients work unchanged: one vector per input, "
                "in input order.",
    body=Body(
        (Field("input", Texts(), "The texts to embed: a string or a list of strings.", required=True),
         Field("encoding_format", String(enum=("float", "base64")),
               "'float': lists of numbers; 'base64': each vector's little-endian float32 bytes.", default="float"),
         *TEXT_OPTIONS),
        example={"input": ["shared memory is fast", "sockets copy bytes"]},
    ),
    replies=(Reply("The vectors and the tokens they took.", obj({
        "object": {"const": "list"},
        "data": array(obj({"object": {"const": "embedding"}, "index": INTEGER,
                           "embedding": {"oneOf": [array(NUMBER), STRING]}})),
        "model": STRING,
        "usage": obj({"prompt_tokens": INTEGER, "total_tokens": INTEGER}),
    })),),
    errors=EMBED_ERRORS,
)

EMBED = Operation(
    summary="Embed texts (text-embeddings-inference's shape)",
    tag="embeddings",
    description="One vector per input, in input order, as text-embeddings-inference's POST /embed.",
    body=Body(
        (Field("inputs", Texts(), "The texts to embed: a string or a list of strings.", required=True),
         Field("normalize", Boolean(), "Make each vector unit length.", default=True),
         *LONG_INPUT_FIELDS,
         *TEXT_OPTIONS),
        example={"inputs": ["shared memory is fast"], "normalize": True},
    ),
    replies=(Reply("The vectors, one list of numbers per input.", array(array(NUMBER))),),
    errors=EMBED_ERRORS,
)


def text_options(args: dict) -> dict:
    """The client's options of a checked body of TEXT_OPTIONS."""
    return {key: args[key] for key in ("prompt", "prompt_name", "dimensions", "model")}


class OpenAIEmbeddings:
    """POST /v1/embeddings, as the OpenAI API and its clients speak it."""

    def __init__(self, ctx):
        self.ctx = ctx

    @OPENAI_EMBEDDINGS
    def on_post(self, req, resp):
        args = OPENAI_EMBEDDINGS.body.read(self.ctx, req)
        options = text_options(args)
        # With dimensions, vectors are cut and made unit length again, as OpenAI's are.
        res = self.ctx.embed(args["input"], normalize=options["dimensions"] is not None, **options)
        data = []
        for i, vec in enumerate(res.vectors):
            if args["encoding_format"] == "base64":
                emb = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = vec  # float32, written by dump_json
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = res.total_tokens
        resp.media = {"object": "list", "data": data, "model": res.model or self.ctx.client.info()["model"],
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class Embed:
    """POST /embed: {"inputs", "normalize", "truncate", "truncation_direction", "chunk", "prompt",
    "prompt_name", "dimensions", "model"} -> [[float]]."""

    def __init__(self, ctx):
        self.ctx = ctx

    @EMBED
    def on_post(self, req, resp):
        args = EMBED.body.read(self.ctx, req)
        res = self.ctx.embed(args["inputs"], normalize=args["normalize"], **long_input_options(args),
                             **text_options(args))
        resp.media = res.vectors  # float32 (n, dim), written by dump_json
