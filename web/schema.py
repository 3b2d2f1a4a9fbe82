"""Request bodies and operations declared once, read twice.

Each route's operation (:class:`Operation`) names its body's fields, their
kinds, limits, defaults, descriptions and an example request; its responses
and the errors it may answer. The resources validate every body with
:meth:`Body.read` (nothing else reads a body's fields), and the OpenAPI
generator (:mod:`web.openapi`) renders the same objects, so the document
says what the code checks: a field, a limit or an accepted value cannot be
added to one and missed in the other. How to declare a route:
docs/http-api-openapi.md.

A field's limits that come from the settings (the number of inputs, the
characters of one input) are read from the app's own settings, so the
document shows the limits the service enforces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shm_protocol.config import Settings

from .errors import too_large, unprocessable

#: A prompt goes before every input of a request: bounded, so that one
#: request cannot multiply its body (2,048 inputs x this, at most).
MAX_PROMPT_CHARS = 2048


def _quoted(values: Sequence[str], conjunction: str = "or") -> str:
    quoted = [f"'{v}'" for v in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


class Kind:
    """The JSON kind of one field: ``check`` turns a body's value into what
    the resource gets, or raises the 4xx that names the field; ``schema`` is
    the JSON Schema of the same rule."""

    def check(self, value: Any, where: str, settings: Settings) -> Any:
        raise NotImplementedError

    def schema(self, settings: Settings) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class String(Kind):
    """A string: ``enum`` its accepted values, ``min_length`` 1 for a
    non-empty one, ``max_length`` a fixed limit, or ``input_limit`` the
    per-input limit of the settings (SHM_EMBED_MAX_INPUT_CHARS).
    ``ignore_case``: an ``enum`` value in any case is taken, as its listed
    spelling (TEI's "Right", Cohere's "end")."""

    enum: tuple[str, ...] = ()
    min_length: int = 0
    max_length: int | None = None
    input_limit: bool = False
    ignore_case: bool = False

    def _limit(self, settings: Settings) -> tuple[int | None, str]:
        if self.input_limit:
            return settings.max_input_chars, " (SHM_EMBED_MAX_INPUT_CHARS)"
        return self.max_length, ""

    def check(self, value, where, settings):
        if self.enum and self.ignore_case and isinstance(value, str):
            value = next((v for v in self.enum if v.lower() == value.lower()), value)
        if self.enum and value not in self.enum:
            raise unprocessable(f"'{where}' must be {_quoted(self.enum)}")
        if not isinstance(value, str):
            raise unprocessable(f"'{where}' must be a {'non-empty ' if self.min_length else ''}string")
        if len(value) < self.min_length:
            raise unprocessable(f"'{where}' must be a non-empty string")
        limit, setting = self._limit(settings)
        if limit is not None and len(value) > limit:
            raise too_large(f"'{where}' has {len(value)} characters, over the limit of {limit}{setting}")
        return value

    def schema(self, settings):
        out: dict = {"type": "string"}
        if self.enum and self.ignore_case:
            # JSON Schema's patterns are ECMA-262's, which have no inline flags: [Rr][Ii]...
            out["pattern"] = "^(" + "|".join("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c)
                                                     for c in v) for v in self.enum) + ")$"
        elif self.enum:
            out["enum"] = list(self.enum)
        if self.min_length:
            out["minLength"] = self.min_length
        limit, _ = self._limit(settings)
        if limit is not None:
            out["maxLength"] = limit
        return out


@dataclass(frozen=True)
class Integer(Kind):
    """An integer (not a boolean), at least ``minimum`` when one is given."""

    minimum: int | None = None

    def check(self, value, where, settings):
        if not isinstance(value, int) or isinstance(value, bool) or (self.minimum is not None
                                                                     and value < self.minimum):
            if self.minimum == 1:
                raise unprocessable(f"'{where}' must be a positive integer")
            at_least = "" if self.minimum is None else f" of at least {self.minimum}"
            raise unprocessable(f"'{where}' must be an integer{at_least}")
        return value

    def schema(self, settings):
        return {"type": "integer", **({} if self.minimum is None else {"minimum": self.minimum})}


@dataclass(frozen=True)
class Boolean(Kind):
    def check(self, value, where, settings):
        if not isinstance(value, bool):
            raise unprocessable(f"'{where}' must be true or false")
        return value

    def schema(self, settings):
        return {"type": "boolean"}


@dataclass(frozen=True)
class Texts(Kind):
    """Texts to embed or score, within the settings' limits (SHM_EMBED_MAX_INPUTS
    texts of at most SHM_EMBED_MAX_INPUT_CHARS characters each): a string or a
    non-empty list of strings; ``list_only`` refuses the single string, and
    ``objects`` also takes ``{"text": ...}`` items (Cohere's documents). The
    resource gets a list of strings."""

    list_only: bool = False
    objects: bool = False

    def check(self, value, where, settings):
        if isinstance(value, str) and not self.list_only:
            texts = [value]
        elif isinstance(value, list):
            if self.objects:
                value = [v["text"] if isinstance(v, dict) and isinstance(v.get("text"), str) else v for v in value]
            if not value:
                raise unprocessable(f"'{where}' must not be an empty list")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or any(
                    isinstance(v, list) for v in value):
                raise unprocessable(
                    f"'{where}' as token arrays is not supported: send strings. (LangChain's OpenAIEmbeddings "
                    "sends tiktoken ids, which are not this model's tokens, unless it is created with "
                    "check_embedding_ctx_length=False.)")
            bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
            if bad is not None:
                raise unprocessable(f"'{where}[{bad}]' must be a string, not {type(value[bad]).__name__}")
            texts = value
        elif self.list_only:
            raise unprocessable(f"'{where}' must be a list")
        else:
            raise unprocessable(f"'{where}' must be a string or a list of strings")
        if len(texts) > settings.max_inputs:
            raise too_large(f"{len(texts)} inputs is over the limit of {settings.max_inputs} (SHM_EMBED_MAX_INPUTS)")
        for i, text in enumerate(texts):
            if len(text) > settings.max_input_chars:
                raise too_large(f"input {i} has {len(text)} characters, over the limit of "
                                f"{settings.max_input_chars} (SHM_EMBED_MAX_INPUT_CHARS)")
        return texts

    def schema(self, settings):
        text = {"type": "string", "maxLength": settings.max_input_chars}
        item = ({"oneOf": [text, {"type": "object", "required": ["text"], "properties": {"text": text}}]}
                if self.objects else text)
        many = {"type": "array", "items": item, "minItems": 1, "maxItems": settings.max_inputs}
        return many if self.list_only else {"oneOf": [text, many]}


@dataclass(frozen=True)
class Passed(Kind):
    """A value the layer below checks (the collection store, the web
    fetcher), passed on as it is; ``json_schema`` documents what it takes."""

    json_schema: dict = field(default_factory=dict)

    def check(self, value, where, settings):
        return value

    def schema(self, settings):
        return dict(self.json_schema)


@dataclass(frozen=True)
class Field:
    """One field of a body. An optional field sent as null is as if absent
    (many clients send their unset options as null): it gets ``default``."""

    name: str
    kind: Kind
    description: str
    required: bool = False
    default: Any = None

    def check(self, doc: dict, settings: Settings, prefix: str = "") -> Any:
        where = prefix + self.name
        value = doc.get(self.name)
        if value is None:
            if self.required:
                raise unprocessable(f"'{where}' is required")
            return self.default
        return self.kind.check(value, where, settings)

    def schema(self, settings: Settings) -> dict:
        out = self.kind.schema(settings)
        if not self.required:  # null means absent
            if "type" in out and "enum" not in out:
                out["type"] = [out["type"], "null"]
            else:
                out = {"anyOf": [out, {"type": "null"}]}
        out["description"] = self.description
        if self.default is not None:
            out["default"] = self.default
        return out


def _object_schema(fields: Sequence[Field], settings: Settings) -> dict:
    required = [f.name for f in fields if f.required]
    return {"type": "object", "properties": {f.name: f.schema(settings) for f in fields},
            **({"required": required} if required else {})}


@dataclass(frozen=True)
class FlagOrObject(Kind):
    """``true`` (every field at its default), ``false`` (None), or an object
    of exactly these fields: options that can be switched on as they are."""

    fields: tuple[Field, ...]

    def check(self, value, where, settings):
        if value is False:
            return None
        if value is True:
            value = {}
        names = [f.name for f in self.fields]
        if not isinstance(value, dict) or set(value) - set(names):
            raise unprocessable(f"'{where}' must be true or an object with {_quoted(names, 'and')}")
        return {f.name: f.check(value, settings, prefix=f"{where}.") for f in self.fields}

    def schema(self, settings):
        return {"oneOf": [{"type": "boolean"},
                          {**_object_schema(self.fields, settings), "additionalProperties": False}]}


@dataclass(frozen=True)
class Body:
    """A JSON object body: its fields and an example request that succeeds.
    Fields it does not name are ignored (OpenAI's clients send "user" and
    others). ``optional``: the body may be left out (no Content-Type, no bytes)."""

    fields: tuple[Field, ...]
    example: dict
    optional: bool = False

    def check(self, doc: dict, settings: Settings) -> dict:
        """The declared fields of ``doc``, checked, with their defaults."""
        return {f.name: f.check(doc, settings) for f in self.fields}

    def read(self, ctx, req) -> dict:
        """The request's body (through the intake's limits), checked."""
        return self.check(self.raw(ctx, req), ctx.settings)

    def raw(self, ctx, req) -> dict:
        """The request's body as a JSON object, unchecked ({} for a left-out optional one)."""
        if self.optional and not req.content_length and req.content_type is None:
            return {}
        return ctx.read_json(req)

    def schema(self, settings: Settings) -> dict:
        return _object_schema(self.fields, settings)


@dataclass(frozen=True)
class Reply:
    """A successful answer: its status, what it means and its JSON Schema
    (or its media type when it is not JSON)."""

    description: str
    schema: dict = field(default_factory=dict)
    status: int = 200
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    """One method of one route: what it does, its body, its answers, and the
    error statuses it may give besides those every route may (the body's
    400/413/415/422 when it takes one, 401 behind the key, 500).
    ``params``: each path parameter's description and example value.
    ``open``: served without the API key."""

    summary: str
    tag: str
    replies: tuple[Reply, ...]
    description: str = ""
    body: Body | None = None
    errors: tuple[int, ...] = ()
    params: dict[str, tuple[str, str]] = field(default_factory=dict)
    open: bool = False

    def __call__(self, responder: Callable) -> Callable:
        """Declare this operation on a responder (``@OPERATION`` above ``on_post``)."""
        responder.operation = self
        return responder


def obj(properties: dict, required: Sequence[str] | None = None, **extra) -> dict:
    """A response's JSON Schema object (every property required unless told)."""
    return {"type": "object", "properties": properties,
            "required": list(properties if required is None else required), **extra}


def array(items: dict, **extra) -> dict:
    return {"type": "array", "items": items, **extra}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))
