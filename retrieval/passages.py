"""Splitting long texts into overlapping passages, each embedded on its own.

The model reads at most ``max_seq_length`` tokens (256 word pieces for
all-MiniLM-L6-v2) and drops the rest, so a long document is cut into windows
of the model's own tokens that fit (less its special tokens and any document
prompt), overlapping so a sentence on a boundary is whole in one of them.
Words separated by spaces are no measure for Chinese, Japanese or Thai: a
whole document of them is one "word". A passage also holds at most a
collection's ``passage_words`` words, and a cut near the window's edge falls
at a sentence end or a space when one is close. Passages are character spans
of the original text: what a search returns is exactly what was stored.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

_WORD = re.compile(r"\S+")

#: Words per passage and words shared by neighbours, unless a collection says otherwise.
#: 120 words is about 160 word pieces of English: inside the model's window with room to spare.
PASSAGE_WORDS = 120
OVERLAP_WORDS = 20

#: How far back from a window's edge (a fraction of the window) a cut looks for a sentence end or a space.
_SLACK = 8
#: What ends a sentence before a space, and what ends one with no space after it (Chinese, Japanese).
_SENTENCE_END = frozenset(".!?;:…")
_CLOSE_END = frozenset("。！？；")


class PassageSplitter:
    """Splits texts into passages of at most ``words`` words and, with a
    tokenizer (``offsets(text)``: its tokens' character spans, without
    special tokens), at most ``window`` tokens; neighbours share ``overlap``
    words (or, where the window cut first, as large a share of its tokens)."""

    def __init__(self, words: int = PASSAGE_WORDS, overlap: int = OVERLAP_WORDS, *,
                 offsets: Callable[[str], list[tuple[int, int]]] | None = None, window: int | None = None):
        if words < 1 or not 0 <= overlap < words:
            raise ValueError(f"need words >= 1 and 0 <= overlap < words, got {words} and {overlap}")
        if offsets is not None and (window is None or window < 1):
            raise ValueError(f"a tokenizer needs a window of at least one token, got {window}")
        self.words, self.overlap, self.offsets, self.window = words, overlap, offsets, window

    def __call__(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of the passages of ``text`` (none for a blank one)."""
        word_spans = [m.span() for m in _WORD.finditer(text)]
        if not word_spans:
            return []
        if self.offsets is None:
            return self._split(text, word_spans, list(range(len(word_spans))), len(word_spans) + 1)
        tokens = [(a, b) for a, b in self.offsets(text) if b > a]
        if not tokens:  # nothing the model reads (control characters, say): the text as it is
            return [(word_spans[0][0], word_spans[-1][1])]
        starts = [a for a, _ in word_spans]
        word_of = [max(bisect.bisect_right(starts, a) - 1, 0) for a, _ in tokens]
        return self._split(text, tokens, word_of, self.window)

    def _split(self, text: str, units: list[tuple[int, int]], word_of: list[int], window: int):
        """Greedy windows over ``units`` (tokens, or words), ``word_of`` each one's word number."""
        n_units, out, start = len(units), [], 0
        while True:
            by_words = bisect.bisect_left(word_of, word_of[start] + self.words, start)
            end = min(by_words, start + window, n_units)
            cut_by_window = end < by_words
            if cut_by_window and end < n_units:
                end = _nicer_cut(text, units, word_of, start, end, max(1, window // _SLACK))
            out.append((units[start][0], units[end - 1][1]))
            if end >= n_units:
                return out
            if cut_by_window:
                shared = (end - start) * self.overlap // self.words
                nxt = end - shared
                # begin the overlap at a word when one starts in its first half
                for j in range(nxt, min(nxt + shared // 2, end) + 1):
                    if word_of[j] != word_of[j - 1]:
                        nxt = j
                        break
            else:
                nxt = bisect.bisect_left(word_of, word_of[end] - self.overlap, start)
            start = max(nxt, start + 1)


def _nicer_cut(text: str, units, word_of, start: int, end: int, slack: int) -> int:
    """Where to end a passage cut by the window at ``end``: after a sentence
    end, else between words, within ``slack`` units back; else at ``end``."""
    lowest = max(start + 1, end - slack)
    space = None
    for j in range(end, lowest - 1, -1):
        gap, last = text[units[j - 1][1]:units[j][0]], text[units[j - 1][1] - 1]
        if "\n" in gap or last in _CLOSE_END or (gap and last in _SENTENCE_END):
            return j
        if space is None and word_of[j] != word_of[j - 1]:
            space = j
    return space if space is not None else end


def split_passages(text: str, words: int = PASSAGE_WORDS, overlap: int = OVERLAP_WORDS) -> list[tuple[int, int]]:
    """Character spans of the passages of ``text`` by words alone (no model's tokens)."""
    return PassageSplitter(words, overlap)(text)


def splitter_for(client, model: str | None = None, prompt: str | None = None, *, words: int = PASSAGE_WORDS,
                 overlap: int = OVERLAP_WORDS) -> PassageSplitter:
    """A splitter to the window of ``client``'s embedding ``model`` for passages
    embedded with ``prompt`` (None: the model's default one). An object with
    only ``embed`` (a store used as a library) splits by words alone."""
    get = getattr(client, "text_tokenizer", None)
    if get is None:
        return PassageSplitter(words, overlap)
    tok, prompt = get(model, prompt)
    return PassageSplitter(words, overlap, offsets=tok.token_offsets, window=tok.window(prompt))
