"""Batch planning, pure: which ready slots join a batch and in what order,
how their texts split into model calls, and when each slot should be answered.

Nothing here touches shared memory or a model; the server feeds it plain
numbers and arrays, and the unit tests do the same.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def fair_order(flats: np.ndarray, seen_ns: np.ndarray, slots_per_ring: int) -> list[int]:
    """Ready slots (flat indices) in the order they may join a batch.

    Within a ring, oldest first by when the *sidecar* first saw the slot
    (``seen_ns``; a worker-written timestamp could be forged to jump the
    queue). Across rings, turns: every waiting ring's oldest slot, then every
    ring's second, and so on, rings ordered by their oldest slot. A ring that
    keeps all its slots ready therefore gets one slot per turn, like any other.
    """
    if len(flats) == 0:
        return []
    order = np.lexsort((flats, seen_ns))
    rings: dict[int, list[int]] = {}
    for flat in np.asarray(flats)[order].tolist():
        rings.setdefault(flat // slots_per_ring, []).append(flat)
    queues = list(rings.values())  # insertion order: the ring with the oldest slot first
    out: list[int] = []
    for turn in range(max(len(q) for q in queues)):
        out.extend(q[turn] for q in queues if turn < len(q))
    return out


def admit(order: list[int], n_texts, n_tokens, max_texts: int, max_tokens: int) -> list[int]:
    """The leading slots of ``order`` that fit the batch budget (texts and
    tokens); the first always joins, however large, so nothing starves."""
    taken: list[int] = []
    texts = tokens = 0
    for flat in order:
        slot_texts, slot_tokens = int(n_texts[flat]), int(n_tokens[flat])
        if taken and (texts + slot_texts > max_texts or tokens + slot_tokens > max_tokens):
            break
        taken.append(flat)
        texts += slot_texts
        tokens += slot_tokens
    return taken


@dataclass
class Plan:
    """Every text of a batch, longest first, cut into model calls."""

    items: list[tuple[int, int, int]]  # (length, work index, text index within the work)
    calls: list[tuple[int, int, int]]  # (start, end) into items and the call's padded width

    def last_call(self, n_works: int) -> list[int]:
        """For each work, the index of the call that holds its last text (its answer time)."""
        last = [0] * n_works
        for ci, (start, end, _) in enumerate(self.calls):
            for _, wi, _ in self.items[start:end]:
                last[wi] = ci
        return last


def plan_calls(text_lengths: list[list[int]], budget_tokens: int,
               max_texts: int | Callable[[int, int], int]) -> Plan:
    """Sort every text of the batch by length (longest first: padding stays
    small) and cut the run into calls of at most ``budget_tokens`` padded
    tokens and ``max_texts`` texts. ``text_lengths[w]`` are work w's texts.
    ``max_texts`` may be a function of a call's width and the texts still to
    plan (a :meth:`sidecar.call_size.CallSizer.rows`), asked once per call."""
    items = [(n, wi, i) for wi, lengths in enumerate(text_lengths) for i, n in enumerate(lengths)]
    items.sort(key=lambda t: -t[0])
    calls: list[tuple[int, int, int]] = []
    if not items:
        return Plan(items, calls)
    budget = max(budget_tokens, items[0][0])
    start = 0
    while start < len(items):
        width = items[start][0]
        rows = max_texts(width, len(items) - start) if callable(max_texts) else max_texts
        end = min(len(items), start + max(1, min(rows, budget // width)))
        calls.append((start, end, width))
        start = end
    return Plan(items, calls)


class CallTimer:
    """Running estimate of one model call's time by power-of-two buckets of
    its rows and its padded width (attention grows with the width, so two
    calls of equal padded tokens can differ): it gives slots their ETA and
    the loop its deadline."""

    def __init__(self) -> None:
        self._ns: dict[tuple[int, int], float] = {}

    @staticmethod
    def bucket(rows: int, width: int) -> tuple[int, int]:
        return int(rows).bit_length(), int(width).bit_length()

    def estimate(self, rows: int, width: int) -> float | None:
        return self._ns.get(self.bucket(rows, width))

    def record(self, rows: int, width: int, ns: int) -> None:
        key = self.bucket(rows, width)
        prev = self._ns.get(key)
        self._ns[key] = ns if prev is None else 0.8 * prev + 0.2 * ns

    def etas(self, plan: Plan, n_works: int, t0_ns: int) -> list[int] | None:
        """Each work's expected answer time, or None while any call's size is new."""
        est = [self.estimate(b - a, width) for a, b, width in plan.calls]
        if any(e is None for e in est):
            return None
        ends = list(itertools.accumulate(est))
        return [t0_ns + int(ends[c]) for c in plan.last_call(n_works)]
