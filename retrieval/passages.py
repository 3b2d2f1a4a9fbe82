"""Splitting long texts into overlapping passages, each embedded on its own.

The model reads at most ``max_seq_length`` tokens (256 word pieces for
all-MiniLM-L6-v2) and drops the rest, so a long document is cut into
windows of words that fit, overlapping so a sentence on a boundary is whole in
one of them. Passages are character spans of the original text: what a search
returns is exactly what was stored.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\S+")

#: Words per passage and words shared by neighbours, unless a collection says otherwise.
#: 120 words is about 160 word pieces of English: inside the model's window with room to spare.
PASSAGE_WORDS = 120
OVERLAP_WORDS = 20


def split_passages(text: str, words: int = PASSAGE_WORDS, overlap: int = OVERLAP_WORDS) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the passages of ``text``.

    A text of at most ``words`` words is one passage; an empty or blank text
    has none. Consecutive passages share ``overlap`` words."""
    if words < 1 or not 0 <= overlap < words:
        raise ValueError(f"need words >= 1 and 0 <= overlap < words, got {words} and {overlap}")
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        return []
    step = words - overlap
    out = []
    for first in range(0, len(spans), step):
        last = min(first + words, len(spans)) - 1
        out.append((spans[first][0], spans[last][1]))
        if last == len(spans) - 1:
            break
    return out
