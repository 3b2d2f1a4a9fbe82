"""Text that cannot be kept or sent: found in what comes in, mended in what goes out.

A JSON ``"\\ud83d"`` escape decodes to a lone surrogate in Python: half an
emoji, as JavaScript's ``slice`` leaves one when it cuts through it. No UTF-8
encoder takes it (the tokenizer, SQLite, PostgreSQL, orjson all refuse), so
a lone surrogate that got into a store made every later answer holding it
fail. U+0000 is refused too: PostgreSQL's text cannot hold it, and the two
stores keep the same documents.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: What no field may hold: a lone surrogate, or U+0000.
_BROKEN = re.compile("[\ud800-\udfff\x00]")
#: A key written as ``.key`` in a path; any other is written as ``["..."]``.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def text_problem(text: str) -> str | None:
    """What is wrong with ``text`` (None: nothing), in words for an error message."""
    found = _BROKEN.search(text)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return "the character U+0000 (NUL), which text may not hold"
    return (f"half a character: a lone surrogate (U+{ord(char):04X}), as cutting UTF-16 text through an emoji "
            "leaves; send whole characters")


def find_broken_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first string or key in ``value`` (parsed JSON) that ``text_problem``
    refuses, as (where, problem): ``where`` is "'path'" of the string, or
    "a key of 'path'" ("a key of the body" at the top), ready for a message.
    Walked without recursion, so any nesting JSON parsing allowed is fine."""
    stack: list[tuple[Any, Any]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                return f"'{_render(where)}'", problem
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and (problem := text_problem(key)) is not None:
                    at = _render(where)
                    return (f"a key of '{at}'" if at else "a key of the body"), problem
                stack.append((child, (where, key)))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, (where, i)) for i, child in enumerate(item))
    return None


def _render(where: Any) -> str:
    """A path kept as nested (parent, key) pairs, written out: ``a.b[0]["c d"]``."""
    parts = []
    while isinstance(where, tuple):
        where, key = where
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif _PLAIN_KEY.fullmatch(key):
            parts.append(f".{key}")
        else:
            parts.append(f"[{json.dumps(key)}]")  # ASCII, every odd character escaped
    parts.append(where)
    return "".join(reversed(parts)).lstrip(".")


def mend(value: Any) -> Any:
    """``value`` with U+FFFD in place of each lone surrogate in its strings
    and keys (a pair of halves becomes its one character), for writing out
    what was stored before text was checked."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, dict):
        return {mend(k): mend(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mend(v) for v in value]
    return value
