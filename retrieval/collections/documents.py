"""What a write to a collection may hold, checked before the store is
touched: collection names, collection options, and documents split into
passages. No database, no FAISS, no embedding here."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from shm_protocol.errors import InvalidInput
from shm_protocol.text import find_broken_text

from ..passages import OVERLAP_WORDS, PASSAGE_WORDS, PassageSplitter

#: Characters of a collection's query or document prompt at most (one is copied onto every passage).
MAX_PROMPT_CHARS = 2048

#: A collection name, matched in full (with re.fullmatch: "$" would also match before a final newline,
#: which let "kb\n" in as a second collection beside "kb").
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_NAME = re.compile(NAME_PATTERN)

#: The kinds of index a collection may ask for (``index``; see retrieval/faiss_index.py).
INDEX_KINDS = ("auto", "flat", "ivf", "binary")
#: A binary collection rescores this many times ``top_k`` Hamming candidates with float vectors, unless
#: its ``rescore_multiplier`` says otherwise (between these bounds).
RESCORE_MULTIPLIER = 4
RESCORE_MULTIPLIER_MIN, RESCORE_MULTIPLIER_MAX = 1, 100

@dataclass(frozen=True)
class CollectionOptions:
    """Per-collection options, fixed when it is created (``PUT /collections/{name}``)."""

    passage_words: int = PASSAGE_WORDS
    overlap_words: int = OVERLAP_WORDS
    index: str = "auto"  # auto: exact until SHM_EMBED_IVF_MIN_VECTORS passages, then IVF; flat; ivf; binary
    rescore_multiplier: int = RESCORE_MULTIPLIER  # binary: Hamming candidates rescored, per result asked for
    model: str | None = None  # the embedding model (a name the sidecar serves); None: the default one
    query_prompt: str | None = None  # prepended to queries; None: the model's default prompt (if any)
    document_prompt: str | None = None  # prepended to passages; None: the model's default prompt (if any)

    @classmethod
    def from_dict(cls, raw: Any) -> CollectionOptions:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidInput("options must be an object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"unknown collection options: {', '.join(sorted(unknown))}")
        check_text(raw, "options")
        opts = cls(**raw)
        for key in ("passage_words", "overlap_words", "rescore_multiplier"):
            value = getattr(opts, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"'{key}' must be an integer")
        if not 8 <= opts.passage_words <= 2000:
            raise InvalidInput("'passage_words' must be between 8 and 2000")
        if not 0 <= opts.overlap_words < opts.passage_words // 2 + 1:
            raise InvalidInput("'overlap_words' must be at least 0 and at most half of 'passage_words'")
        if opts.index not in INDEX_KINDS:
            raise InvalidInput(f"'index' must be one of {', '.join(INDEX_KINDS)}")
        if not RESCORE_MULTIPLIER_MIN <= opts.rescore_multiplier <= RESCORE_MULTIPLIER_MAX:
            raise InvalidInput(f"'rescore_multiplier' must be an integer from {RESCORE_MULTIPLIER_MIN} to "
                               f"{RESCORE_MULTIPLIER_MAX}")
        for key, limit in (("model", 200), ("query_prompt", MAX_PROMPT_CHARS), ("document_prompt", MAX_PROMPT_CHARS)):
            value = getattr(opts, key)
            if value is not None and (not isinstance(value, str) or len(value) > limit or "\x00" in value):
                raise InvalidInput(f"'{key}' must be a string of at most {limit} characters")
        return opts


@dataclass
class Document:
    id: str
    text: str
    url: str | None
    metadata: dict
    spans: list[tuple[int, int]]

    @property
    def passages(self) -> list[str]:
        return [self.text[a:b] for a, b in self.spans]


def check_text(value: Any, path: str) -> None:
    """InvalidInput naming the first string or key in ``value`` (at ``path``)
    that holds a lone surrogate or U+0000: neither store can keep them as
    text (PostgreSQL takes neither; SQLite kept half characters that then
    failed every answer holding them), so both refuse them."""
    found = find_broken_text(value, path)
    if found is not None:
        where, problem = found
        raise InvalidInput(f"{where} holds {problem}")


def check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"collection name {name!r}: 1 to 128 letters, digits, '_', '-' or '.', "
                           f"starting with a letter or digit ({NAME_PATTERN})")


def parse_documents(documents: Any, opts: CollectionOptions, split: PassageSplitter | None = None) -> list[Document]:
    """Check the documents of a write and split each into passages (with
    ``split``, to the collection's model's window; else by words alone)."""
    split = split or PassageSplitter(opts.passage_words, opts.overlap_words)
    if not isinstance(documents, list) or not documents:
        raise InvalidInput("'documents' must be a non-empty list")
    out, seen = [], set()
    for position, raw in enumerate(documents):
        if isinstance(raw, str):
            raw = {"text": raw}
        if not isinstance(raw, dict):
            raise InvalidInput(f"documents[{position}] must be an object")
        unknown = set(raw) - {"id", "text", "url", "metadata"}
        if unknown:
            raise InvalidInput(f"documents[{position}]: unknown fields {', '.join(sorted(unknown))}")
        check_text(raw, f"documents[{position}]")
        doc_id = raw.get("id")
        if doc_id is None:
            doc_id = uuid.uuid4().hex
        elif isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        elif not isinstance(doc_id, str) or not doc_id or len(doc_id) > 512:
            raise InvalidInput(f"documents[{position}].id must be a string of 1 to 512 characters or an integer")
        if doc_id in seen:
            raise InvalidInput(f"documents[{position}]: id {doc_id!r} appears twice in this request")
        seen.add(doc_id)
        text = raw.get("text")
        if not isinstance(text, str):
            raise InvalidInput(f"documents[{position}].text must be a string")
        spans = split(text)
        if not spans:
            raise InvalidInput(f"documents[{position}].text is empty")
        url = raw.get("url")
        if url is not None and not isinstance(url, str):
            raise InvalidInput(f"documents[{position}].url must be a string")
        metadata = raw.get("metadata")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise InvalidInput(f"documents[{position}].metadata must be an object")
        try:
            json.dumps(metadata, allow_nan=False)  # NaN is no JSON: neither store could filter on it
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"documents[{position}].metadata is not JSON: {exc}") from None
        out.append(Document(doc_id, text, url, metadata, spans))
    return out

