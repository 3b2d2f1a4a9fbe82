"""POST /tokenize and POST /decode, in text-embeddings-inference's shape,
answered from the worker's own copy of the model's tokenizer (no round trip
to the sidecar; see shm_protocol.tokens)."""

from __future__ import annotations

from .embeddings import MODEL
from .schema import BOOLEAN, INTEGER, STRING, Body, Boolean, Field, Operation, Passed, Reply, String, Texts, array, obj

NULLABLE_INTEGER = {"type": ["integer", "null"]}

TOKENIZE = Operation(
    summary="Split texts into the model's tokens (text-embeddings-inference's shape)",
    tag="tokens",
    description="One list of tokens per input, each with its id, its text, whether it is a special token, and "
                "its character offsets (start, stop) in the text the model reads, the prompt included; null "
                "offsets for special tokens. Not truncated; more than SHM_EMBED_MAX_REQUEST_TOKENS tokens in "
                "all is a 413.",
    body=Body(
        (Field("inputs", Texts(), "The texts to tokenize: a string or a list of strings.", required=True),
         Field("add_special_tokens", Boolean(), "Add the model's special tokens ([CLS], [SEP]...).", default=True),
         Field("prompt_name", String(), "The name of one of the model's configured prompts, put before each text."),
         MODEL),
        example={"inputs": ["shared memory is fast"]},
    ),
    replies=(Reply("The tokens of each input.", array(array(obj({
        "id": INTEGER, "text": STRING, "special": BOOLEAN, "start": NULLABLE_INTEGER, "stop": NULLABLE_INTEGER})))),),
    errors=(404, 503),
)

DECODE = Operation(
    summary="Turn token ids back into text (text-embeddings-inference's shape)",
    tag="tokens",
    description="One string per list of ids. An id below 0 or at or past the vocabulary's size is a 422 "
                "naming it.",
    body=Body(
        (Field("ids", Passed({"oneOf": [array(INTEGER), array(array(INTEGER))]}),
               "A list of token ids, or a list of such lists.", required=True),
         Field("skip_special_tokens", Boolean(), "Leave the special tokens out of the text.", default=True),
         MODEL),
        example={"ids": [101, 3756, 3638, 2003, 3435, 102]},
    ),
    replies=(Reply("The text of each list of ids.", array(STRING)),),
    errors=(404, 503),
)


class Tokenize:
    """POST /tokenize: {"inputs", "add_special_tokens", "prompt_name", "model"}
    -> [[{"id", "text", "special", "start", "stop"}]]."""

    def __init__(self, ctx):
        self.ctx = ctx

    @TOKENIZE
    def on_post(self, req, resp):
        args = TOKENIZE.body.read(self.ctx, req)
        tokenized = self.ctx.client.tokenize(
            args["inputs"], model=args["model"], prompt_name=args["prompt_name"],
            add_special_tokens=args["add_special_tokens"],
            max_tokens=self.ctx.settings.max_request_tokens)  # 413 above
        resp.media = [[token.as_dict() for token in t.tokens] for t in tokenized]


class Decode:
    """POST /decode: {"ids", "skip_special_tokens", "model"} -> [str]."""

    def __init__(self, ctx):
        self.ctx = ctx

    @DECODE
    def on_post(self, req, resp):
        args = DECODE.body.read(self.ctx, req)
        resp.media = self.ctx.client.decode(args["ids"], model=args["model"],
                                            skip_special_tokens=args["skip_special_tokens"])  # 422 for a bad id


def add_routes(routes, ctx) -> None:
    """Add /tokenize and /decode to ``routes`` (web.openapi.RouteTable)."""
    routes.add("/tokenize", Tokenize(ctx))
    routes.add("/decode", Decode(ctx))
