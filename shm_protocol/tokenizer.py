"""Tokenizing in the worker: the model's own fast tokenizer (no torch),
and the checks every client applies to its texts before they reach a slot."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import long_inputs
from .errors import InvalidInput, RequestTooLarge

# Tokenizers loaded before a fork (by the Gunicorn master), by file path: the
# first client of each forked worker takes the loaded one instead of reading
# the file again, so the workers share its pages copy-on-write.
_preloaded: dict = {}


def preload_tokenizer(path: str) -> None:
    """Load the tokenizer at ``path`` now, for the processes this one forks."""
    from tokenizers import Tokenizer

    _preloaded[path] = Tokenizer.from_file(path)


# Compiled tokenizers by file (path, size, mtime): immutable, so every client
# of a process shares one (building one from a 700 kB tokenizer.json takes
# 20-30 ms, which a process attaching many clients would pay each time).
_compiled: dict = {}


def _compiled_tokenizer(path: str, tok):
    """The compiled WordPiece for the tokenizer at ``path`` (loaded as
    ``tok``), or None when it is of another shape (hotpath.wordpiece)."""
    from . import hotpath

    try:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
    except OSError:
        return hotpath.wordpiece(tok.to_str())
    if key not in _compiled:
        _compiled[key] = hotpath.wordpiece(tok.to_str())
    return _compiled[key]


@dataclass
class Tokenized:
    """One request's texts as the model sees them, and their token ids."""

    texts: list[str]  # with the prompt prepended, if any
    ids: list[list[int]]
    lengths: np.ndarray  # int64, tokens per text after truncation
    tokenize_ns: int
    segments: np.ndarray | None = None  # pairs: where each pair's second segment starts (its first type id 1)
    # Chunked texts (long_inputs.CHUNK): ids and lengths are per window, and
    # these give each window's text index and content tokens.
    owners: np.ndarray | None = None
    weights: np.ndarray | None = None

    @property
    def token_counts(self) -> np.ndarray:
        """Tokens each text sends to the model (all its windows')."""
        if self.owners is None:
            return self.lengths
        return np.bincount(self.owners, weights=self.lengths, minlength=len(self.texts)).astype(np.int64)


class WorkerTokenizer:
    """The model's own fast tokenizer, set to truncate at the model's limit."""

    def __init__(self, path: str, max_seq_length: int):
        from tokenizers import Tokenizer

        self.path = path
        self.max_seq_length = max_seq_length
        self._tok = _preloaded.pop(path, None) or Tokenizer.from_file(path)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_seq_length)
        self._untruncated = None  # made on first need (pairs, passages)
        self._template: _PairTemplate | None = None
        self._single: tuple[list[int], list[int]] | None = None  # special ids before and after one text
        # The compiled tokenizer for ASCII texts, when this is a BERT WordPiece
        # tokenizer (hotpath.wordpiece); texts that hold an added token's text
        # ([CLS], [MASK], ...) go to the library, which matches those first.
        self._fast = _compiled_tokenizer(path, self._tok)
        self._added = tuple(t.content for t in self._tok.get_added_tokens_decoder().values())

    def tokenize_request(self, texts: list[str], *, prompt: str | None, truncate: bool,
                         max_tokens: int | None, policy: str | None = None) -> Tokenized:
        """Prepend ``prompt``, tokenize, and apply the request's checks: an
        input over the model's limit is RequestTooLarge unless ``truncate``,
        and so are more than ``max_tokens`` tokens in all (check_token_budget).
        ``policy`` (one of long_inputs.POLICIES) overrides ``truncate``: cut
        at the end or the start, refuse, or cut into windows (Tokenized.owners).
        Every client (the sidecar's and the local fallback) prepares texts here."""
        if policy is not None:
            if policy not in long_inputs.POLICIES:
                raise InvalidInput(f"unknown long-input policy {policy!r}: {', '.join(long_inputs.POLICIES)}")
            if policy in (long_inputs.TRUNCATE_LEFT, long_inputs.CHUNK):
                return self._tokenize_long(texts, prompt, policy, max_tokens)
            truncate = policy == long_inputs.TRUNCATE
        if prompt:
            texts = [prompt + t for t in texts]
        t0 = time.perf_counter_ns()
        fast = self._encode_fast(texts, truncate)
        if fast is not None:
            lengths = np.array([len(x) for x in fast], dtype=np.int64)
            check_token_budget(lengths, max_tokens)
            return Tokenized(texts, fast, lengths, time.perf_counter_ns() - t0)
        # About a MiB of text at a time: an encoding keeps the windows cut
        # off a long text (about 150 bytes a token), so 16 MiB of text at once
        # would take GiBs for the few ids kept of it.
        ids: list[list[int]] = []
        for first, last in batches(texts):
            encs = self.encode(texts[first:last], first)
            if not truncate:
                for i, e in enumerate(encs, first):
                    if e.overflowing:
                        full = len(e.ids) + sum(len(o.ids) for o in e.overflowing) - 2 * len(e.overflowing)
                        raise RequestTooLarge(
                            f"input {i} has about {full} tokens; the model's limit is {self.max_seq_length} "
                            "(send truncate=true to cut it, or chunk=true to embed it in windows)",
                            limit=self.max_seq_length, actual=full, what="tokens",
                        )
            ids += [e.ids for e in encs]
            del encs
        tokenize_ns = time.perf_counter_ns() - t0
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        check_token_budget(lengths, max_tokens)
        return Tokenized(texts, ids, lengths, tokenize_ns)

    def tokenize_pairs(self, query: str, documents: list[str], *, truncate: bool,
                       max_tokens: int | None) -> Tokenized:
        """(query, document) pairs as CrossEncoder.predict tokenizes them
        (``[CLS] query [SEP] document [SEP]`` for BERT, cut longest part
        first at the model's limit): ids, lengths and where each pair's
        second segment starts. A pair over the limit is RequestTooLarge
        unless ``truncate``; more than ``max_tokens`` in all too.

        Each side is tokenized once on its own and the pair is put together
        here, as the tokenizer's truncation and post-processor would: asking
        the tokenizer for the truncated pair makes it keep every combination
        of both sides' overflow windows (gigabytes for two long texts)."""
        t0 = time.perf_counter_ns()
        pair = self._pair_template()
        target = self.max_seq_length - pair.added  # content tokens a pair keeps
        query_enc = self._encode_raw([query], "query")[0]
        nq = len(query_enc)
        if not truncate and nq > target:
            raise RequestTooLarge(f"the query alone has {nq} tokens, over the {target} the model's limit of "
                                  f"{self.max_seq_length} leaves with a document (send truncate=true to cut it)",
                                  limit=self.max_seq_length, actual=nq + pair.added, what="tokens")
        query_ids = query_enc.ids[:target]
        del query_enc
        # Each pair has at least the query's tokens (or the limit): a budget
        # that cannot hold that many is refused before any document is read.
        floor = min(self.max_seq_length, nq + pair.added)
        _check_budget_floor(0, floor * len(documents), max_tokens)
        ids: list[list[int]] = []
        lengths = np.zeros(len(documents), np.int64)
        segments = np.zeros(len(documents), np.int64)
        total = 0
        for first, last in batches(documents):
            for i, doc in enumerate(self._encode_raw(documents[first:last], "texts", first), first):
                nd = len(doc)
                if not truncate and nq + nd > target:
                    raise RequestTooLarge(
                        f"the query with document {i} has {nq + nd + pair.added} tokens, over the model's limit of "
                        f"{self.max_seq_length} (send truncate=true to cut it)", limit=self.max_seq_length,
                        actual=nq + nd + pair.added, what="tokens")
                query_kept, doc_kept = longest_first(nq, nd, target)
                one, segments[i] = pair.join(query_ids[:query_kept], doc.ids[:doc_kept])
                ids.append(one)
                lengths[i] = len(one)
                total += len(one)
            _check_budget_floor(total, floor * (len(documents) - last), max_tokens)
        tokenize_ns = time.perf_counter_ns() - t0
        return Tokenized(list(documents), ids, lengths, tokenize_ns, segments)

    def _tokenize_long(self, texts: list[str], prompt: str | None, policy: str,
                       max_tokens: int | None) -> Tokenized:
        """``texts`` with ``prompt`` prepended, cut at their start
        (TRUNCATE_LEFT: the prompt's tokens are kept, the text's first ones
        go) or into windows (CHUNK: the prompt is in the first window only)
        of the model's limit, special tokens around each."""
        t0 = time.perf_counter_ns()
        if prompt:
            texts = [prompt + t for t in texts]
        before, after = self.single_template()
        room = self.max_seq_length - len(before) - len(after)
        kept = self._encode_raw([prompt], "prompt")[0].ids if prompt else []
        if len(kept) >= room:
            kept = []
        ids: list[list[int]] = []
        owners: list[int] = []
        weights: list[int] = []
        total = 0
        for first, last in batches(texts):
            start = len(ids)
            for i, enc in enumerate(self._encode_raw(texts[first:last], "texts", first), first):
                content = enc.ids
                if policy == long_inputs.TRUNCATE_LEFT:
                    # A prompt whose tokens merge with the text's is cut like the text.
                    head = kept if content[:len(kept)] == kept else []
                    rest = content[len(head):]
                    ids.append(before + head + rest[max(0, len(rest) - (room - len(head))):] + after)
                    continue
                for run in long_inputs.windows(content, room):
                    ids.append(before + run + after)
                    owners.append(i)
                    weights.append(len(run))
            # The budget, a batch (about a MiB of text) at a time: the windows
            # of a 16 MiB body would otherwise be held, GiBs of them, before a 413.
            total += sum(len(x) for x in ids[start:])
            if max_tokens is not None and total > max_tokens and last < len(texts):
                raise RequestTooLarge(f"the inputs have at least {total} tokens after truncation, over the limit "
                                      f"of {max_tokens} per request", limit=max_tokens, actual=total, what="tokens")
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        check_token_budget(lengths, max_tokens)
        if policy == long_inputs.TRUNCATE_LEFT:
            return Tokenized(texts, ids, lengths, time.perf_counter_ns() - t0)
        return Tokenized(texts, ids, lengths, time.perf_counter_ns() - t0, owners=np.array(owners, np.int64),
                         weights=np.array(weights, np.int64))

    def single_template(self) -> tuple[list[int], list[int]]:
        """The special token ids the tokenizer puts before and after one
        text (read off a probe text), to build truncated texts and windows
        from ids as its truncation and post-processor would."""
        single = self._single
        if single is None:
            raw = self._raw()
            probe = raw.encode("a b c", add_special_tokens=False)
            full = raw.post_process(probe, None, add_special_tokens=True)
            content = [i for i, special in enumerate(full.special_tokens_mask) if not special]
            start = content[0] if content else 0
            if full.ids[start:start + len(probe.ids)] != probe.ids or len(content) != len(probe.ids):
                raise InvalidInput("this model's tokenizer changes a text's own tokens around its special "
                                   "tokens, which left truncation and chunking do not serve")
            single = self._single = (full.ids[:start], full.ids[start + len(probe.ids):])
        return single

    def _encode_fast(self, texts: list[str], truncate: bool) -> list[list[int]] | None:
        """Ids of every text from the compiled tokenizer, or None when any
        text is not for it (not ASCII, an added token's text inside, or over
        the limit without ``truncate``: the library then says by how much)."""
        fast = self._fast
        if fast is None or not texts:
            return None
        out = []
        limit = self.max_seq_length
        for text in texts:
            if not isinstance(text, str) or any(a in text for a in self._added):
                return None
            encoded = fast.encode(text, limit)
            if encoded is None or (encoded[1] and not truncate):
                return None
            out.append(encoded[0])
        return out

    def encode_untruncated(self, texts: list[str], add_special_tokens: bool = True) -> list:
        """Encodings of ``texts`` in full, special tokens added if asked."""
        try:
            return self._raw().encode_batch(texts, add_special_tokens=add_special_tokens)
        except (TypeError, ValueError) as exc:
            raise _refused(texts, exc) from exc

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer knows (its added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """The text of each row of ids (checked below vocab_size by the caller)."""
        return self._tok.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of ``text``'s tokens, all of them, without special tokens."""
        return self._encode_raw([text], "text")[0].offsets

    def window(self, prompt: str | None = None) -> int:
        """Tokens of one text the model reads after its special tokens and ``prompt``.
        A prompt's tokens may merge with the text's first ones or not: one spare token."""
        processor = self._raw().post_processor
        added = processor.num_special_tokens_to_add(False) if processor is not None else 0
        spent = len(self._encode_raw([prompt], "prompt")[0]) + 1 if prompt else 0
        return max(1, self.max_seq_length - added - spent)

    def _pair_template(self) -> _PairTemplate:
        template = self._template
        if template is None:
            template = self._template = _PairTemplate.of(self._raw())
        return template

    def _encode_raw(self, texts: list[str], field: str, first: int = 0) -> list:
        """Encodings of ``texts`` in full, without special tokens."""
        try:
            return self._raw().encode_batch(texts, add_special_tokens=False)
        except (TypeError, ValueError) as exc:
            raise _refused(texts, exc, field, first) from exc

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

    def encode(self, texts: Sequence, first: int = 0):
        """Truncated encodings of ``texts`` (``first``: the index of the
        first in the request, for an error naming one)."""
        try:
            if len(texts) == 1:
                one = texts[0]
                return [self._tok.encode(*one) if isinstance(one, tuple) else self._tok.encode(one)]
            return self._tok.encode_batch(texts)
        except (TypeError, ValueError) as exc:
            raise _refused(texts, exc, first=first) from exc


def _refused(texts: Sequence, exc: Exception, field: str = "texts", first: int = 0) -> InvalidInput:
    """The tokenizer's refusal of ``texts``, naming the culprit (a lone surrogate, typically)."""
    for i, t in enumerate(texts, first):
        try:
            (t if isinstance(t, str) else "".join(t)).encode("utf-8")
        except UnicodeEncodeError:
            where = f"{field}[{i}]" if field == "texts" else field
            return InvalidInput(f"{where} is not valid Unicode (it has a lone surrogate)")
    return InvalidInput(f"the tokenizer refused the input: {exc}")


#: Characters of documents tokenized at once for pairs: their full encodings
#: are held together, so this bounds a request's memory, not its length.
_PAIR_BATCH_CHARS = 1 << 20


def batches(texts: list[str]) -> Iterator[tuple[int, int]]:
    """Runs ``[first, last)`` of ``texts`` of about _PAIR_BATCH_CHARS each (one text at least)."""
    first, chars = 0, 0
    for i, t in enumerate(texts):
        if i > first and chars + len(t) > _PAIR_BATCH_CHARS:
            yield first, i
            first, chars = i, 0
        chars += len(t)
    if texts:
        yield first, len(texts)


def longest_first(n1: int, n2: int, target: int) -> tuple[int, int]:
    """Tokens kept of each side of a pair of ``n1`` and ``n2`` tokens when at
    most ``target`` fit: the tokenizers library's "longest_first" pair
    truncation (the shorter side whole if the longer can make room, else
    half each, the odd token to the longer side, to the second on a tie)."""
    if n1 + n2 <= target:
        return n1, n2
    short, long_ = min(n1, n2), max(n1, n2)
    long_ = short if short > target else max(short, target - short)
    if short + long_ > target:
        short = target // 2
        long_ = short + target % 2
    return (long_, short) if n1 > n2 else (short, long_)


@dataclass(frozen=True)
class _PairTemplate:
    """Where the tokenizer's post-processor puts its special tokens around a
    pair (read off a probe pair), to build pairs from ids without it."""

    before: list[int]   # ids before the first text
    between: list[int]  # between the two
    after: list[int]    # after the second
    types: tuple[int, int, int, int, int]  # type id of: before, first text, between, second text, after

    @property
    def added(self) -> int:
        return len(self.before) + len(self.between) + len(self.after)

    @classmethod
    def of(cls, raw) -> _PairTemplate:
        first, second = raw.encode_batch(["a b c", "d e"], add_special_tokens=False)
        full = raw.post_process(first, second, add_special_tokens=True)
        ids, types = full.ids, full.type_ids
        content = [i for i, special in enumerate(full.special_tokens_mask) if not special]
        if len(content) != len(first) + len(second):
            raise InvalidInput("this model's tokenizer changes a pair's own tokens, which is not served here")
        a0, a1, b0, b1 = content[0], content[len(first) - 1] + 1, content[len(first)], content[-1] + 1
        out = cls(ids[:a0], ids[a1:b0], ids[b1:],
                  (types[0] if a0 else 0, types[a0], types[a1] if b0 > a1 else 0, types[b0],
                   types[b1] if b1 < len(ids) else 0))
        if out.join(first.ids, second.ids)[0] != ids or out.type_ids(len(first), len(second)) != types:
            raise InvalidInput("this model's tokenizer puts special tokens around a pair in a way not served here")
        return out

    def type_ids(self, n1: int, n2: int) -> list[int]:
        types = self.types
        return ([types[0]] * len(self.before) + [types[1]] * n1 + [types[2]] * len(self.between) + [types[3]] * n2
                + [types[4]] * len(self.after))

    def join(self, first: list[int], second: list[int]) -> tuple[list[int], int]:
        """The pair's ids, and where its first type id 1 is (0: none)."""
        parts = ((self.before, self.types[0]), (first, self.types[1]), (self.between, self.types[2]),
                 (second, self.types[3]), (self.after, self.types[4]))
        ids: list[int] = []
        segment = 0
        for part, type_id in parts:
            if type_id == 1 and not segment and part:
                segment = len(ids)
            ids += part
        return ids, segment


def _check_budget_floor(done: int, rest_at_least: int, max_tokens: int | None) -> None:
    """RequestTooLarge once ``done`` tokens and at least ``rest_at_least`` more are over ``max_tokens``."""
    if max_tokens is not None and (total := done + rest_at_least) > max_tokens:
        some = "at least " if rest_at_least else ""
        raise RequestTooLarge(f"the inputs have {some}{total} tokens after truncation, over the limit of {max_tokens} "
                              "per request", limit=max_tokens, actual=total, what="tokens")


def check_token_budget(lengths: np.ndarray, max_tokens: int | None) -> None:
    if max_tokens is not None and (total := int(lengths.sum())) > max_tokens:
        raise RequestTooLarge(f"the inputs have {total} tokens after truncation, over the limit of {max_tokens} "
                              "per request", limit=max_tokens, actual=total, what="tokens")


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInput("texts must be a list of strings, not one string (wrap it in a list)")
    if isinstance(texts, Mapping):  # its keys would be embedded, its values dropped
        raise InvalidInput("texts must be a list of strings, not a dict (pass list(d) to embed its keys)")
    if not isinstance(texts, Iterable):
        raise InvalidInput(f"texts must be a list of strings, not {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}] is {type(t).__name__}, not str")
    return texts
