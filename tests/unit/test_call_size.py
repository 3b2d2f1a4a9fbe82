"""Texts per model call chosen from measured throughput (sidecar.call_size),
fed with a cost curve instead of a model: the sizer must find the curve's
best size from a poor start, and must not try other sizes on a load that a
single call serves."""

import pytest

from sidecar.call_size import EXPLORE_EVERY, CallSizer
from sidecar.planner import plan_calls


def cpu_like_seconds(rows: int, width: int) -> float:
    """A CPU's shape: a fixed cost per call, a cost per padded token that
    grows once a call's activations leave the caches (past 32 rows of 32
    tokens), so texts/s peaks at 32 rows for this width."""
    tokens = rows * width
    per_token = 1e-6 * (1 + max(0, tokens - 1024) / 1024)
    return 1e-3 + tokens * per_token


def serve(sizer: CallSizer, batches: int, texts: int, width: int, seconds=cpu_like_seconds) -> list[int]:
    """Plan and 'run' ``batches`` batches of ``texts`` texts of ``width``
    tokens, as the scheduler does; the row counts of every call."""
    sizes = []
    for _ in range(batches):
        plan = plan_calls([[width] * texts], 1 << 20, sizer.rows)
        for start, end, call_width in plan.calls:
            sizer.record(end - start, call_width, seconds(end - start, call_width))
            sizes.append(end - start)
    return sizes


def rate(rows: int, width: int = 32) -> float:
    return rows / cpu_like_seconds(rows, width)


def test_the_curve_peaks_where_the_test_says():
    assert max((1 << k for k in range(9)), key=rate) == 32


@pytest.mark.parametrize("start", [1, 4, 256])
def test_it_converges_to_the_best_size_from_any_start(start):
    sizer = CallSizer(start, 256)
    serve(sizer, 400, 200, 32)
    assert sizer.best(32) == 32, sizer.rates(32)
    assert sizer.rows(32, 200) in (16, 32, 64)  # the best, or at most a neighbour being explored
    # Once converged, nearly every call runs at the best size: exploring is bounded.
    before = sizer.explorations
    calls = serve(sizer, 50, 200, 32)
    assert sizer.explorations - before <= len(calls) // EXPLORE_EVERY + 1
    assert calls.count(32) >= 0.8 * len(calls), calls


def test_each_width_learns_its_own_size():
    """At 128 tokens a text the same curve peaks at 8 rows (1024 tokens)."""
    sizer = CallSizer(32, 256)
    serve(sizer, 400, 200, 32)
    serve(sizer, 400, 200, 128)
    assert (sizer.best(32), sizer.best(128)) == (32, 8), sizer.describe()


def test_a_lone_small_request_is_never_split_or_explored():
    sizer = CallSizer(32, 256)
    calls = serve(sizer, 200, 1, 20)
    assert calls == [1] * 200 and sizer.explorations == 0
    # 16 clients with one text each: one call of 16 every time, however the
    # lone texts before were measured (slower per text, as 1-text calls are).
    calls = serve(sizer, 200, 16, 20)
    assert calls == [16] * 200 and sizer.explorations == 0


def test_a_fixed_size_is_kept_whatever_is_measured():
    sizer = CallSizer(4, 256, fixed=True)
    assert serve(sizer, 20, 16, 32) == [4] * 80 and sizer.explorations == 0


def test_sizes_are_powers_of_two_up_to_the_largest_allowed():
    sizer = CallSizer(1000, 100)
    assert sizer.sizes == [1, 2, 4, 8, 16, 32, 64, 100] and sizer.start_rows == 100
    assert (sizer.size_of(63), sizer.size_of(64), sizer.size_of(99), sizer.size_of(100)) == (32, 64, 64, 100)
    with pytest.raises(ValueError):
        CallSizer(0, 8)


def test_describe_names_the_best_size_of_each_width():
    sizer = CallSizer(32, 256)
    assert sizer.describe() == ""
    serve(sizer, 400, 200, 32)
    assert sizer.describe().startswith("32-63 tokens: 32 (") and "texts/s" in sizer.describe()
