"""Tokens of texts and texts of tokens, with a worker's own tokenizer (no
round trip to the sidecar), in the shape of text-embeddings-inference's
``/tokenize`` and ``/decode``.

A text is tokenized as an embed call would read it: the prompt (if any)
first, special tokens around it unless ``add_special_tokens`` is false, and
NOT truncated, so a client sees how far past the model's limit a text runs.
Each token carries its id, its text, whether it is a special token, and
its ``start`` and ``stop`` character offsets into the text the model reads
(the prompt included, as TEI gives them); special tokens have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidInput, RequestTooLarge
from .tokenizer import WorkerTokenizer, batches, check_texts


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    special: bool
    start: int | None  # character offsets into the text the model reads; None for a special token
    stop: int | None

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "special": self.special, "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class TokenizedText:
    """One text's tokens."""

    text: str  # as the model reads it: the prompt, then the text
    tokens: list[Token]

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


def tokenize_texts(tok: WorkerTokenizer, texts: Sequence[str], *, prompt: str | None = None,
                   add_special_tokens: bool = True, max_tokens: int | None = None) -> list[TokenizedText]:
    """The tokens of each of ``texts`` (``prompt`` prepended), untruncated;
    RequestTooLarge past ``max_tokens`` in all, found before the tokens of
    more than about a MiB of text are held (a token object takes about 200
    bytes: a 16 MiB body would otherwise take a worker gigabytes)."""
    texts = check_texts(texts)
    if not isinstance(add_special_tokens, bool):
        raise InvalidInput(f"add_special_tokens={add_special_tokens!r}: must be true or false")
    read = [prompt + t for t in texts] if prompt else texts
    encodings: list = []
    total = 0
    for first, last in batches(read):
        batch = tok.encode_untruncated(read[first:last], add_special_tokens)
        encodings += batch
        total += sum(len(enc.ids) for enc in batch)
        if max_tokens is not None and total > max_tokens:
            raise RequestTooLarge(f"the inputs have {'at least ' if last < len(read) else ''}{total} tokens, over "
                                  f"the limit of {max_tokens} per request", limit=max_tokens, actual=total,
                                  what="tokens")
    out = []
    for text, enc in zip(read, encodings):
        tokens = []
        for token_id, (start, stop), special, piece in zip(enc.ids, enc.offsets, enc.special_tokens_mask,
                                                           enc.tokens):
            if special:
                tokens.append(Token(token_id, piece, True, None, None))
            else:
                tokens.append(Token(token_id, text[start:stop], False, start, stop))
        out.append(TokenizedText(text, tokens))
    return out


def check_ids(ids, vocab_size: int, field: str = "ids") -> list[list[int]]:
    """``ids`` (a list of ints, or a list of such lists) as a list of lists,
    each id from 0 to ``vocab_size`` - 1; InvalidInput naming the first
    entry at fault otherwise."""
    if not isinstance(ids, list):
        raise InvalidInput(f"'{field}' must be a list of token ids or a list of such lists")
    nested = [isinstance(row, list) for row in ids]
    if any(nested) and not all(nested):
        raise InvalidInput(f"'{field}' must be a list of token ids or a list of such lists, not a mix")
    rows = ids if ids and all(nested) else [ids]
    for r, row in enumerate(rows):
        for j, token_id in enumerate(row):
            where = f"{field}[{r}][{j}]" if rows is ids else f"{field}[{j}]"
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise InvalidInput(f"'{where}' is {type(token_id).__name__}; token ids are integers")
            if not 0 <= token_id < vocab_size:
                raise InvalidInput(f"'{where}' is {token_id}; token ids of this model are 0 to {vocab_size - 1}")
    return rows


def decode_ids(tok: WorkerTokenizer, ids, *, vocab_size: int, skip_special_tokens: bool = True) -> list[str]:
    """The text of each row of ``ids`` (check_ids), one string per row."""
    if not isinstance(skip_special_tokens, bool):
        raise InvalidInput(f"skip_special_tokens={skip_special_tokens!r}: must be true or false")
    rows = check_ids(ids, min(vocab_size, tok.vocab_size))
    return tok.decode(rows, skip_special_tokens)
