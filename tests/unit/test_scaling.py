"""Worker scaling as pure logic: the policy's thresholds, bounds and clocks,
the busy share from two readings, the worker's meter, the ring check."""

from __future__ import annotations

import pytest

from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError
from tests.helpers import new_namespace
from web.scaling import BusyMeter, RingLoad, ScalePolicy, busy_share, check_rings


def policy(**kw) -> ScalePolicy:
    return ScalePolicy(**{"min_workers": 1, "max_workers": 4, "up_busy": 0.75, "down_busy": 0.25,
                          "up_after_s": 2.0, "down_after_s": 10.0, **kw})


def test_up_only_after_the_load_lasted_and_then_a_cool_down():
    p = policy()
    assert p.decide(0.0, 1, 1.0) == 1  # high, but not for long yet
    assert p.decide(1.0, 1, 1.0) == 1
    assert p.decide(2.0, 1, 1.0) == 2
    assert p.decide(3.0, 2, 1.0) == 2  # the clock restarted with the change
    assert p.decide(4.0, 2, 1.0) == 2
    assert p.decide(5.0, 2, 1.0) == 3
    assert p.decide(6.0, 3, 0.5) == 3  # between the thresholds: nothing moves


def test_a_dip_restarts_the_up_clock():
    p = policy()
    p.decide(0.0, 1, 0.9)
    p.decide(1.0, 1, 0.5)
    assert p.decide(2.5, 1, 0.9) == 1
    assert p.decide(4.5, 1, 0.9) == 2


def test_step_follows_the_load_within_the_maximum():
    p = policy(max_workers=8, up_after_s=0.0)
    assert p.decide(0.0, 4, 1.0) == 6  # 4 x 1.0 / 0.75 = 5.3: two more
    assert policy(max_workers=5, up_after_s=0.0).decide(0.0, 4, 1.0) == 5
    assert policy(up_after_s=0.0).decide(0.0, 4, 1.0) == 4  # at the maximum already


def test_down_one_at_a_time_after_load_stays_low():
    p = policy()
    assert p.decide(0.0, 3, 0.1) == 3
    assert p.decide(9.9, 3, 0.1) == 3
    assert p.decide(10.0, 3, 0.1) == 2
    assert p.decide(11.0, 2, 0.0) == 2  # another full period for the next one
    assert p.decide(20.9, 2, 0.0) == 2
    assert p.decide(21.0, 2, 0.0) == 1
    assert p.decide(40.0, 1, 0.0) == 1  # never below the minimum


def test_low_load_interrupted_restarts_the_down_clock():
    p = policy()
    p.decide(0.0, 3, 0.1)
    p.decide(8.0, 3, 0.5)
    assert p.decide(12.0, 3, 0.1) == 3
    assert p.decide(22.0, 3, 0.1) == 2


def test_no_removal_that_would_push_the_others_over_the_top():
    # Two workers 25% busy are low, but one alone would be 50% busy: over up_busy here.
    p = policy(up_busy=0.4, down_busy=0.3, down_after_s=0.0)
    assert p.decide(0.0, 2, 0.25) == 2
    assert p.decide(1.0, 2, 0.1) == 1


def test_counts_outside_the_bounds_come_back_inside():
    p = policy(min_workers=2, max_workers=3)
    assert p.decide(0.0, 1, 0.5) == 2
    assert p.decide(0.0, 5, 0.5) == 3


@pytest.mark.parametrize("kw", [{"min_workers": 0}, {"min_workers": 3, "max_workers": 2},
                                {"down_busy": 0.8}, {"up_busy": 1.5}])
def test_bad_policies_are_refused(kw):
    with pytest.raises(ConfigError):
        policy(**kw)


def test_busy_share_counts_same_leases_only():
    before = {1: RingLoad(1, (0, 5), 100), 2: RingLoad(2, (1, 5), 0), 3: RingLoad(3, (2, 5), 7)}
    after = {1: RingLoad(1, (0, 5), 1100), 2: RingLoad(2, (1, 9), 10**9), 3: RingLoad(3, (2, 5), 7)}
    # only pid 1's 1000 ns count: pid 2 leased again, pid 3 was idle; 4 workers x 2 threads x 1000 ns
    assert busy_share(before, after, 1000, 4, 2) == pytest.approx(1000 / 8000)
    assert busy_share(before, {1: RingLoad(1, (0, 5), 10**12)}, 1000, 1, 1) == 1.0
    assert busy_share({}, after, 0, 4, 2) == 0.0


def test_meter_integrates_requests_in_progress():
    now = [0]
    published = []
    meter = BusyMeter(lambda *row: published.append(row), clock=lambda: now[0])
    meter.begin()
    now[0] = 100
    meter.begin()
    now[0] = 300
    meter.end()
    now[0] = 400
    meter.end()
    # one request 0..400 and one 100..300: 600 ns
    assert published == [(1, 0, 0), (2, 100, 100), (1, 500, 300), (0, 600, 400)]


def test_worker_range_defaults_and_ring_check():
    env = {"SHM_EMBED_NAMESPACE": new_namespace(), "WEB_CONCURRENCY": "3"}
    assert Settings.from_env(env).worker_range == (3, 3)
    assert Settings.from_env({**env, "WEB_MAX_WORKERS": "6"}).worker_range == (3, 6)
    assert Settings.from_env({**env, "WEB_MIN_WORKERS": "5"}).worker_range == (5, 5)
    with pytest.raises(ConfigError, match="WEB_MAX_WORKERS=2: must be at least WEB_MIN_WORKERS"):
        Settings.from_env({**env, "WEB_MAX_WORKERS": "2"})
    with pytest.raises(ConfigError, match="WEB_SCALE_DOWN_BUSY"):
        Settings.from_env({**env, "WEB_SCALE_DOWN_BUSY": "0.9"})
    check_rings(Settings.from_env({**env, "WEB_MAX_WORKERS": "16"}))  # no sidecar: the configured 16 rings
    with pytest.raises(ConfigError, match=r"WEB_MAX_WORKERS=17 workers need 17 rings, but SHM_EMBED_RINGS=16"):
        check_rings(Settings.from_env({**env, "WEB_MAX_WORKERS": "17"}))
