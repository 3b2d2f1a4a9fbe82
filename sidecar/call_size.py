"""How many texts one model call takes, chosen from the throughput the
sidecar measures while it serves.

A model's texts/s depends on the rows of a call and their padded width: a
CPU runs best at 16-32 rows and slower per text beyond (the activations
leave the caches), a GPU keeps gaining up to its token budget, and the best
row count shifts with the width. At start each model times calls of 32
tokens (:meth:`sidecar.model.Embedder._best_call_rows`); that is where a
:class:`CallSizer` starts. From then on every call's (rows, width, seconds)
feeds a small table of texts/s per (rows bucket, width bucket), an
exponentially weighted average, and each call of a batch takes the row
count whose bucket runs fastest at its width.

Buckets nobody's traffic reaches are measured by exploring: at most one
decision in ``explore_every`` tries the next size up or down from the best
one. A batch of 16 texts or fewer never explores, so a lone request, or 16
clients with one text each, is never cut into smaller calls to learn
something.

Pure: no clock, no model, no shared memory; the scheduler feeds it samples
and asks it for sizes, and the unit tests do the same with a cost curve.
"""

from __future__ import annotations

import bisect

#: Weight of a new sample in a bucket's texts/s: calls of one size vary by
#: 2x under load, so a few samples decide, not one.
RATE_WEIGHT = 0.25

#: A batch of at most this many texts is never cut into smaller calls to
#: explore (16 clients with one text each get one call, as before).
EXPLORE_MIN_PENDING = 16

#: One decision in this many, among those that split a batch anyway, tries
#: a neighbouring size instead of the best one.
EXPLORE_EVERY = 16


class CallSizer:
    """Row counts per call, refined from measured texts/s.

    ``start_rows`` is where every width starts (the start-up measurement);
    ``max_rows`` the most texts one call may take. ``fixed`` (an operator's
    SHM_EMBED_CALL_ROWS) turns the refinement off: :meth:`rows` is then
    always ``start_rows``.
    """

    def __init__(self, start_rows: int, max_rows: int, *, fixed: bool = False,
                 explore_every: int = EXPLORE_EVERY, weight: float = RATE_WEIGHT) -> None:
        if max_rows < 1 or start_rows < 1:
            raise ValueError(f"call sizes need at least one row (start {start_rows}, max {max_rows})")
        self.max_rows = max_rows
        self.fixed = fixed
        self.explore_every = max(1, explore_every)
        self.weight = weight
        # The sizes a call may be given: powers of two up to max_rows, and max_rows.
        sizes = [1 << k for k in range(max_rows.bit_length()) if 1 << k <= max_rows]
        if sizes[-1] != max_rows:
            sizes.append(max_rows)
        self.sizes = sizes
        self.start_rows = min(start_rows, max_rows)
        self._start_size = self.size_of(self.start_rows)
        self._rates: dict[int, dict[int, float]] = {}  # width bucket -> {size: texts/s}
        self._since_explore = 0
        self._explore_up = True  # alternates where both neighbours are measured
        #: Decisions that tried a neighbouring size (for tests and logs).
        self.explorations = 0

    # -- buckets ------------------------------------------------------------------
    def size_of(self, rows: int) -> int:
        """The bucket of a call of ``rows`` texts: the largest size at most ``rows``."""
        return self.sizes[max(0, bisect.bisect_right(self.sizes, rows) - 1)]

    @staticmethod
    def width_bucket(width: int) -> int:
        """Widths 16-31 share a bucket, 32-63 the next, and so on."""
        return int(width).bit_length()

    # -- samples --------------------------------------------------------------------
    def record(self, rows: int, width: int, seconds: float) -> None:
        """A call of ``rows`` texts padded to ``width`` tokens took ``seconds``."""
        if rows < 1 or seconds <= 0:
            return
        rate = rows / seconds
        table = self._rates.setdefault(self.width_bucket(width), {})
        size = self.size_of(rows)
        prev = table.get(size)
        table[size] = rate if prev is None else (1 - self.weight) * prev + self.weight * rate

    def rates(self, width: int) -> dict[int, float]:
        """Measured texts/s by call size at ``width`` (a copy)."""
        return dict(self._rates.get(self.width_bucket(width), {}))

    def best(self, width: int) -> int:
        """The size with the best measured texts/s at ``width``. Until the
        start size is measured there, it wins over smaller sizes as long as
        the largest measured size is also the fastest (the curve still rises):
        small calls are all a light load makes, and their rates say nothing
        about larger calls (1 text a call is the slowest per text)."""
        table = self._rates.get(self.width_bucket(width))
        if not table:
            return self._start_size
        measured = max(table, key=table.get)
        if measured < self._start_size and self._start_size not in table and measured == max(table):
            return self._start_size
        return measured

    # -- decisions ------------------------------------------------------------------
    def rows(self, width: int, pending: int) -> int:
        """Texts the next call of a batch takes at most: its longest text has
        ``width`` tokens and ``pending`` texts of the batch are still to run."""
        if self.fixed:
            return self.start_rows
        best = self.best(width)
        if pending <= EXPLORE_MIN_PENDING:
            return best
        at = self.sizes.index(best)
        # Up only where the batch goes past the best size, down only where
        # the smaller size would cut it: otherwise the call would not change.
        up = self.sizes[at + 1] if at + 1 < len(self.sizes) and pending > best else None
        down = self.sizes[at - 1] if at > 0 and pending > self.sizes[at - 1] else None
        if up is None and down is None:
            return best
        self._since_explore += 1
        if self._since_explore < self.explore_every:
            return best
        self._since_explore = 0
        self.explorations += 1
        table = self._rates.get(self.width_bucket(width), {})
        for size in (up, down):  # one never measured at this width first
            if size is not None and size not in table:
                return size
        if up is None or down is None:
            return up or down
        self._explore_up = not self._explore_up
        return up if self._explore_up else down

    def describe(self) -> str:
        """The best size per measured width bucket, for a log line."""
        parts = []
        for bucket in sorted(self._rates):
            table = self._rates[bucket]
            size = self.best(1 << (bucket - 1))
            rate = f"{table[size]:.0f} texts/s" if size in table else "the start size, not measured here yet"
            parts.append(f"{1 << (bucket - 1)}-{(1 << bucket) - 1} tokens: {size} ({rate})")
        return ", ".join(parts)
