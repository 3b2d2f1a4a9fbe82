"""Classification resources: POST /predict (text-embeddings-inference's
shape) and POST /classify (vLLM's): a sequence classifier gives each
input's labels their scores (softmax, or sigmoid for a multi-label model),
as transformers' text-classification pipeline does."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .errors import too_large, unprocessable
from .schema import (
    INTEGER,
    NUMBER,
    STRING,
    Body,
    Boolean,
    Field,
    Kind,
    Operation,
    Reply,
    String,
    Texts,
    array,
    obj,
)

CLASSIFY_MODEL = Field("model", String(), "A served classifier's name (GET /v1/models); default: the sidecar's "
                       "first classifier.")
CLASSIFY_ERRORS = (404, 429, 503)
EXAMPLE_TEXTS = ["The service answered at once.", "The queue was full again."]

#: One input's labels, best first.
LABEL_SCORES = array(obj({"label": STRING, "score": NUMBER}))


@dataclass(frozen=True)
class PredictInputs(Kind):
    """TEI's ``inputs``: a text, a pair (a list of exactly two texts, as
    TEI reads it), or a list of texts and pairs. The resource gets
    (inputs, batch): a list of texts and (text, text_pair) tuples, and
    whether the answer is a list per input (else the one input's list)."""

    def check(self, value, where, settings):
        if isinstance(value, str):
            items, batch = [value], False
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            items, batch = [tuple(value)], False
        elif isinstance(value, list):
            if not value:
                raise unprocessable(f"'{where}' must not be an empty list")
            items = []
            for i, item in enumerate(value):
                if isinstance(item, str):
                    items.append(item)
                elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
                    items.append((item[0], item[1]))
                else:
                    raise unprocessable(f"'{where}[{i}]' must be a string or a pair of strings [text, text_pair]")
            batch = True
        else:
            raise unprocessable(f"'{where}' must be a string, a pair of strings, or a list of strings or pairs")
        if len(items) > settings.max_inputs:
            raise too_large(f"{len(items)} inputs is over the limit of {settings.max_inputs} (SHM_EMBED_MAX_INPUTS)")
        for i, item in enumerate(items):
            chars = len(item) if isinstance(item, str) else len(item[0]) + len(item[1])
            if chars > settings.max_input_chars:
                raise too_large(f"input {i} has {chars} characters, over the limit of "
                                f"{settings.max_input_chars} (SHM_EMBED_MAX_INPUT_CHARS)")
        return items, batch

    def schema(self, settings):
        text = {"type": "string", "maxLength": settings.max_input_chars}
        pair = {"type": "array", "items": text, "minItems": 2, "maxItems": 2}
        many = {"type": "array", "items": {"oneOf": [text, pair]}, "minItems": 1, "maxItems": settings.max_inputs}
        return {"oneOf": [text, pair, many]}


TEI_PREDICT = Operation(
    summary="Classify texts or pairs (text-embeddings-inference's shape)",
    tag="classify",
    description="A list of exactly two strings is one pair (text, text_pair), as text-embeddings-inference "
                "reads it: two texts to classify each on its own go to /classify, or in two requests.",
    body=Body(
        (Field("inputs", PredictInputs(), "A text, a pair [text, text_pair], or a list of texts and pairs.",
               required=True),
         Field("raw_scores", Boolean(), "The model's logits instead of their softmax (or sigmoid).", default=False),
         Field("truncate", Boolean(), "Cut inputs longer than the model's limit; false: such an input is a 413.",
               default=True),
         CLASSIFY_MODEL),
        example={"inputs": [*EXAMPLE_TEXTS, ["Is the service up?", "It answered at once."]]},
    ),
    replies=(Reply("Per input, every label with its score, best first (for one input: its list alone).",
                   {"oneOf": [LABEL_SCORES, array(LABEL_SCORES)]}),),
    errors=CLASSIFY_ERRORS,
)

VLLM_CLASSIFY = Operation(
    summary="Classify texts (vLLM's shape)",
    tag="classify",
    body=Body(
        (Field("input", Texts(), "A text or a list of texts.", required=True),
         Field("truncate", Boolean(), "Cut inputs longer than the model's limit; false: such an input is a 413.",
               default=True),
         CLASSIFY_MODEL),
        example={"input": EXAMPLE_TEXTS},
    ),
    replies=(Reply("Per input, its best label and every label's probability, in the labels' order.", obj({
        "id": STRING, "object": {"const": "list"}, "created": INTEGER, "model": STRING,
        "data": array(obj({"index": INTEGER, "label": STRING, "probs": array(NUMBER), "num_classes": INTEGER})),
        "usage": obj({"prompt_tokens": INTEGER, "total_tokens": INTEGER, "completion_tokens": INTEGER}),
    })),),
    errors=CLASSIFY_ERRORS,
)


class Predict:
    """POST /predict -> [{"label", "score"}] per input, best first."""

    def __init__(self, ctx):
        self.ctx = ctx

    @TEI_PREDICT
    def on_post(self, req, resp):
        args = TEI_PREDICT.body.read(self.ctx, req)
        inputs, batch = args["inputs"]
        res = self.ctx.classify(inputs, model=args["model"], raw_scores=args["raw_scores"], truncate=args["truncate"])
        ranked = res.ranked()
        resp.media = ranked if batch else ranked[0]


class Classify:
    """POST /classify -> {"data": [{"index", "label", "probs", "num_classes"}], "usage", ...}."""

    def __init__(self, ctx):
        self.ctx = ctx

    @VLLM_CLASSIFY
    def on_post(self, req, resp):
        args = VLLM_CLASSIFY.body.read(self.ctx, req)
        res = self.ctx.classify(args["input"], model=args["model"], truncate=args["truncate"])
        best = res.scores.argmax(axis=1) if len(res.scores) else []
        data = [{"index": i, "label": res.labels[int(top)], "probs": res.scores[i].tolist(),
                 "num_classes": len(res.labels)} for i, top in enumerate(best)]
        resp.media = {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                      "model": res.model, "data": data,
                      "usage": {"prompt_tokens": res.total_tokens, "total_tokens": res.total_tokens,
                                "completion_tokens": 0}}
