"""Tokenizing in the worker: the model's own fast tokenizer (no torch),
and the checks every client applies to its texts before they reach a slot."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput, RequestTooLarge

# Tokenizers loaded before a fork (by the Gunicorn master), by file path: the
# first client of each forked worker takes the loaded one instead of reading
# the file again, so the workers share its pages copy-on-write.
_preloaded: dict = {}


def preload_tokenizer(path: str) -> None:
    """Load the tokenizer at ``path`` now, for the processes this one forks."""
    from tokenizers import Tokenizer

    _preloaded[path] = Tokenizer.from_file(path)


@dataclass
class Tokenized:
    """One request's texts as the model sees them, and their token ids."""

    texts: list[str]  # with the prompt prepended, if any
    ids: list[list[int]]
    lengths: np.ndarray  # int64, tokens per text after truncation
    tokenize_ns: int
    segments: np.ndarray | None = None  # pairs: where each pair's second segment starts (its first type id 1)


class WorkerTokenizer:
    """The model's own fast tokenizer, set to truncate at the model's limit."""

    def __init__(self, path: str, max_seq_length: int):
        from tokenizers import Tokenizer

        self.path = path
        self.max_seq_length = max_seq_length
        self._tok = _preloaded.pop(path, None) or Tokenizer.from_file(path)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_seq_length)
        self._untruncated = None  # made on first need (pairs with a long query)
        # The compiled tokenizer for ASCII texts, when this is a BERT WordPiece
        # tokenizer (hotpath.wordpiece); texts that hold an added token's text
        # ([CLS], [MASK], ...) go to the library, which matches those first.
        from . import hotpath

        self._fast = hotpath.wordpiece(self._tok.to_str())
        self._added = tuple(t.content for t in self._tok.get_added_tokens_decoder().values())

    def tokenize_request(self, texts: list[str], *, prompt: str | None, truncate: bool,
                         max_tokens: int | None) -> Tokenized:
        """Prepend ``prompt``, tokenize, and apply the request's checks: an
        input over the model's limit is RequestTooLarge unless ``truncate``,
        and so are more than ``max_tokens`` tokens in all (check_token_budget).
        Every client (the sidecar's and the local fallback) prepares texts here."""
        if prompt:
            texts = [prompt + t for t in texts]
        t0 = time.perf_counter_ns()
        fast = self._encode_fast(texts, truncate)
        if fast is not None:
            lengths = np.array([len(x) for x in fast], dtype=np.int64)
            check_token_budget(lengths, max_tokens)
            return Tokenized(texts, fast, lengths, time.perf_counter_ns() - t0)
        encs = self.encode(texts) if texts else []
        tokenize_ns = time.perf_counter_ns() - t0
        if not truncate:
            for i, e in enumerate(encs):
                if e.overflowing:
                    full = len(e.ids) + sum(len(o.ids) for o in e.overflowing) - 2 * len(e.overflowing)
                    raise RequestTooLarge(
                        f"input {i} has about {full} tokens; the model's limit is {self.max_seq_length} "
                        "(send truncate=true to cut it)",
                        limit=self.max_seq_length, actual=full, what="tokens",
                    )
        ids, lengths = _ids_within_budget(encs, max_tokens)
        return Tokenized(texts, ids, lengths, tokenize_ns)

    def tokenize_pairs(self, query: str, documents: list[str], *, truncate: bool,
                       max_tokens: int | None) -> Tokenized:
        """(query, document) pairs tokenized as pairs, as CrossEncoder.predict
        does (``[CLS] query [SEP] document [SEP]`` for BERT, cut longest part
        first at the model's limit): ids, lengths and where each pair's
        second segment starts. A pair over the limit is RequestTooLarge
        unless ``truncate``; more than ``max_tokens`` in all too."""
        t0 = time.perf_counter_ns()
        pairs = list(zip(self._pair_queries(query, documents, truncate), documents)) if documents else []
        encs = self.encode(pairs) if pairs else []
        tokenize_ns = time.perf_counter_ns() - t0
        if not truncate:
            for i, e in enumerate(encs):
                if e.overflowing:
                    raise RequestTooLarge(
                        f"the query with document {i} is over the model's limit of {self.max_seq_length} tokens "
                        "(send truncate=true to cut it)", limit=self.max_seq_length,
                        actual=self.max_seq_length + 1, what="tokens")  # at least: the cut pair is not measured
        ids, lengths = _ids_within_budget(encs, max_tokens)
        segments = np.zeros(len(encs), np.int64)
        for i, e in enumerate(encs):
            types = e.type_ids
            segments[i] = types.index(1) if 1 in types else 0
        return Tokenized([d for _, d in pairs], ids, lengths, tokenize_ns, segments)

    def _encode_fast(self, texts: list[str], truncate: bool) -> list[list[int]] | None:
        """Ids of every text from the compiled tokenizer, or None when any
        text is not for it (not ASCII, an added token's text inside, or over
        the limit without ``truncate``: the library then says by how much)."""
        fast = self._fast
        if fast is None or not texts:
            return None
        out = []
        limit = self.max_seq_length
        for t in texts:
            if not isinstance(t, str) or any(a in t for a in self._added):
                return None
            r = fast.encode(t, limit)
            if r is None or (r[1] and not truncate):
                return None
            out.append(r[0])
        return out

    def _pair_queries(self, query: str, documents: list[str], truncate: bool) -> list[str]:
        """The query to pair with each document: the query itself, or, when it
        is over the model's limit, cut to as many tokens as that pair can
        keep. The tokenizer's longest-first truncation keeps at most the
        limit of either part and gives the odd token to the longer one, so a
        cut that keeps max(limit, document + 1) tokens gives the very same
        pair; and a 100,000-character query is not tokenized in full again
        for each of 2,000 documents. A query over the limit alone is
        RequestTooLarge unless ``truncate``."""
        raw = self._raw()
        q = raw.encode(query, add_special_tokens=False)
        n = len(q.ids)
        if n <= self.max_seq_length:
            return [query] * len(documents)
        if not truncate:
            raise RequestTooLarge(f"the query alone has {n} tokens, over the model's limit of {self.max_seq_length} "
                                  "(send truncate=true to cut it)", limit=self.max_seq_length, actual=n, what="tokens")
        cuts: dict[int, str] = {}
        out = []
        for e in raw.encode_batch(documents, add_special_tokens=False):
            keep = max(self.max_seq_length, len(e.ids) + 1)
            out.append(query if keep >= n else cuts.setdefault(keep, query[: q.offsets[keep - 1][1]]))
        return out

    def _raw(self):
        """A copy of the tokenizer without truncation, for true token counts."""
        raw = self._untruncated
        if raw is None:
            from tokenizers import Tokenizer

            raw = Tokenizer.from_str(self._tok.to_str())
            raw.no_truncation()
            raw.no_padding()
            self._untruncated = raw
        return raw

    def encode(self, texts: Sequence):
        try:
            if len(texts) == 1:
                one = texts[0]
                return [self._tok.encode(*one) if isinstance(one, tuple) else self._tok.encode(one)]
            return self._tok.encode_batch(texts)
        except (TypeError, ValueError) as exc:
            for i, t in enumerate(texts):  # name the culprit (a lone surrogate, typically)
                try:
                    (t if isinstance(t, str) else "".join(t)).encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidInput(f"texts[{i}] is not valid Unicode (it has a lone surrogate)") from None
            raise InvalidInput(f"the tokenizer refused the input: {exc}") from exc


def _ids_within_budget(encs, max_tokens: int | None) -> tuple[list[list[int]], np.ndarray]:
    """The encodings' ids and lengths, RequestTooLarge over ``max_tokens`` in all."""
    ids = [e.ids for e in encs]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    check_token_budget(lengths, max_tokens)
    return ids, lengths


def check_token_budget(lengths: np.ndarray, max_tokens: int | None) -> None:
    if max_tokens is not None and (total := int(lengths.sum())) > max_tokens:
        raise RequestTooLarge(f"the inputs have {total} tokens after truncation, over the limit of {max_tokens} "
                              "per request", limit=max_tokens, actual=total, what="tokens")


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInput("texts must be a list of strings, not one string (wrap it in a list)")
    if not isinstance(texts, Iterable):
        raise InvalidInput(f"texts must be a list of strings, not {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}] is {type(t).__name__}, not str")
    return texts
