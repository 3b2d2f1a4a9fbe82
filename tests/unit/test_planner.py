"""The sidecar's batch planning, without shared memory or a model."""

import numpy as np

from sidecar.planner import CallTimer, admit, fair_order, plan_calls


def test_rings_take_turns_oldest_first_by_the_sidecars_own_clock():
    spr = 4
    # ring 0 has four slots ready, seen long ago; ring 2 one slot seen later; ring 1 one seen in between.
    flats = np.array([0, 1, 2, 3, 4, 8])
    seen = np.array([10, 11, 12, 13, 15, 20], dtype=np.uint64)
    assert fair_order(flats, seen, spr) == [0, 4, 8, 1, 2, 3]


def test_order_within_a_ring_is_by_seen_time_not_slot_index():
    flats = np.array([0, 1, 2])
    seen = np.array([30, 10, 20], dtype=np.uint64)
    assert fair_order(flats, seen, 4) == [1, 2, 0]
    assert fair_order(np.array([], dtype=np.int64), np.array([], dtype=np.uint64), 4) == []


def test_admit_stops_at_the_budget_but_always_takes_the_first():
    n_texts = np.array([64, 2, 3, 1])
    n_tokens = np.array([9000, 20, 30, 10])
    assert admit([0, 1, 2, 3], n_texts, n_tokens, max_texts=8, max_tokens=100) == [0]
    assert admit([1, 2, 3, 0], n_texts, n_tokens, max_texts=8, max_tokens=100) == [1, 2, 3]
    assert admit([1, 2, 3], n_texts, n_tokens, max_texts=4, max_tokens=100) == [1]


def test_calls_are_sorted_longest_first_and_fit_the_budget():
    plan = plan_calls([[5, 50, 7], [49, 3]], budget_tokens=100, max_texts=3)
    lengths = [n for n, _, _ in plan.items]
    assert lengths == sorted(lengths, reverse=True)
    for a, b, width in plan.calls:
        assert width == plan.items[a][0] and (b - a) * width <= 100 and b - a <= 3
    assert sum(b - a for a, b, _ in plan.calls) == 5
    # Work 0's last text (length 5) is in the last call; work 1's (length 3) too.
    assert plan.last_call(2) == [len(plan.calls) - 1, len(plan.calls) - 1]


def test_a_text_wider_than_the_budget_still_gets_a_call_of_its_own():
    plan = plan_calls([[300, 2]], budget_tokens=100, max_texts=8)
    assert plan.calls[0] == (0, 1, 300)


def test_etas_need_every_call_size_timed_and_add_up():
    timer = CallTimer()
    plan = plan_calls([[10], [10], [200]], budget_tokens=256, max_texts=8)
    assert timer.etas(plan, 3, 1000) is None
    for a, b, width in plan.calls:
        timer.record(b - a, width, 5_000)
    etas = timer.etas(plan, 3, 1000)
    assert etas == [1000 + 5_000 * (plan.last_call(3)[w] + 1) for w in range(3)]
    timer.record(1, 200, 15_000)  # a running average, not the last value
    assert 5_000 < timer.estimate(1, 200) < 15_000
