"""Passive target health (SPEC §2.6) as a state machine, driven by a fake clock.

3 consecutive failures within 30 s mark a target failed, 2 consecutive
successes mark it healthy, a failed target gets a trial at most every 10 s in
its priority place, and when everything has failed the best target is still
tried first.
"""

from __future__ import annotations

import pytest

from portunus.model import Rule
from portunus.relay.stats import RuleCounters
from portunus.relay.targets import FAIL_WINDOW, TRIAL_INTERVAL, TargetSet


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def target_set(clock, *targets: str, listen_port: int = 10000) -> TargetSet:
    rule = Rule.from_dict({"rule_id": "r1", "listen_port": listen_port, "targets": list(targets)})
    return TargetSet(rule, RuleCounters(rule.listen_ports), clock=clock, wall_clock=lambda: 1.7e9)


def order(ts: TargetSet) -> list[int]:
    """The indexes ``candidates()`` returns (note: this counts as a connection attempt)."""
    return [s.index for s in ts.candidates()]


def fail(ts: TargetSet, index: int, times: int = 1, every: float = 0.0, clock: FakeClock | None = None) -> None:
    for _ in range(times):
        ts.record_failure(ts.states[index])
        if clock is not None:
            clock.now += every


def succeed(ts: TargetSet, index: int, times: int = 1) -> None:
    for _ in range(times):
        ts.record_success(ts.states[index])


# ---------------------------------------------------------------- failing

def test_three_failures_within_the_window_mark_a_target_failed(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 2, every=10, clock=clock)
    assert ts.states[0].healthy
    fail(ts, 0)
    state = ts.states[0]
    assert not state.healthy
    assert state.consecutive_failures == 3
    assert state.to_dict()["health"] == "failed"
    assert state.last_failure_at == 1.7e9
    assert ts.counters.target_failovers_total == 1


def test_three_failures_exactly_at_the_window_edge_still_count(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 2, every=FAIL_WINDOW / 2, clock=clock)  # at 0 s, 15 s; now 30 s
    fail(ts, 0)
    assert not ts.states[0].healthy


def test_three_failures_spread_over_more_than_the_window_do_not(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3, every=20, clock=clock)  # at 0, 20, 40 s: the first is 40 s before the third
    assert ts.states[0].healthy
    assert ts.counters.target_failovers_total == 0
    clock.now = 1000 + 45
    fail(ts, 0)  # the last three are now at 20, 40, 45 s: within 30 s
    assert not ts.states[0].healthy


def test_a_success_between_failures_resets_the_count(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 2)
    succeed(ts, 0)
    fail(ts, 0, 2)
    assert ts.states[0].healthy
    assert ts.states[0].consecutive_failures == 2
    fail(ts, 0)
    assert not ts.states[0].healthy


def test_more_failures_of_a_failed_target_are_no_second_failover(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 6)
    assert not ts.states[0].healthy
    assert ts.counters.target_failovers_total == 1


def test_a_single_target_fails_and_recovers_without_counting_failovers(clock):
    ts = target_set(clock, "10.0.0.1:80")
    fail(ts, 0, 3)
    assert not ts.states[0].healthy
    assert order(ts) == [0]  # the only target is always tried
    succeed(ts, 0, 2)
    assert ts.states[0].healthy
    assert ts.counters.target_failovers_total == 0


# ---------------------------------------------------------------- recovering

def test_two_consecutive_successes_make_a_failed_target_healthy(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3)
    succeed(ts, 0)
    assert not ts.states[0].healthy
    succeed(ts, 0)
    assert ts.states[0].healthy
    assert ts.states[0].consecutive_failures == 0
    assert ts.states[0].last_success_at == 1.7e9
    assert ts.counters.target_failovers_total == 2  # away and back


def test_a_failure_between_recovery_successes_starts_recovery_over(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3)
    succeed(ts, 0)
    fail(ts, 0)
    succeed(ts, 0)
    assert not ts.states[0].healthy
    succeed(ts, 0)
    assert ts.states[0].healthy


def test_successes_of_a_healthy_target_change_nothing(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    succeed(ts, 0, 5)
    assert ts.states[0].healthy
    assert ts.counters.target_failovers_total == 0


# ---------------------------------------------------------------- order and trials

def test_order_is_by_priority_with_ties_in_list_order(clock):
    ts = target_set(clock, "10.0.0.1:80@2", "10.0.0.2:80@1", "10.0.0.3:80@1", "10.0.0.4:80@0")
    assert order(ts) == [3, 1, 2, 0]


def test_default_priorities_follow_the_list(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    assert order(ts) == [0, 1, 2]


def test_a_failed_target_moves_behind_the_healthy_ones(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    fail(ts, 0, 3)
    clock.now += 1
    assert order(ts) == [1, 2, 0]


def test_failed_targets_keep_their_priority_order_among_themselves(clock):
    ts = target_set(clock, "10.0.0.1:80@3", "10.0.0.2:80@1", "10.0.0.3:80@2")
    fail(ts, 1, 3)
    fail(ts, 0, 3)
    clock.now += 1
    assert order(ts) == [2, 1, 0]


def test_when_every_target_failed_the_best_one_is_tried_first(clock):
    ts = target_set(clock, "10.0.0.1:80@2", "10.0.0.2:80@1", "10.0.0.3:80@3")
    for i in range(3):
        fail(ts, i, 3)
    clock.now += 1
    assert order(ts) == [1, 0, 2]


def test_a_failed_target_gets_a_trial_in_its_place_every_trial_interval(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3)  # failed at t0: its trial clock starts now
    t0 = clock.now
    clock.now = t0 + TRIAL_INTERVAL - 0.5
    assert order(ts) == [1, 0]
    clock.now = t0 + TRIAL_INTERVAL
    assert order(ts) == [0, 1]  # the trial
    clock.now = t0 + TRIAL_INTERVAL + 1
    assert order(ts) == [1, 0]  # one trial per interval, not one per connection
    clock.now = t0 + 2 * TRIAL_INTERVAL - 0.5
    assert order(ts) == [1, 0]
    clock.now = t0 + 2 * TRIAL_INTERVAL
    assert order(ts) == [0, 1]


def test_a_failed_trial_waits_a_full_interval_for_the_next(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3)
    clock.now += TRIAL_INTERVAL
    assert order(ts)[0] == 0
    fail(ts, 0)  # the trial connection failed
    clock.now += TRIAL_INTERVAL - 1
    assert order(ts) == [1, 0]
    clock.now += 1
    assert order(ts) == [0, 1]


def test_after_a_successful_trial_the_target_keeps_its_place_until_healthy(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3)
    clock.now += TRIAL_INTERVAL
    assert order(ts)[0] == 0
    succeed(ts, 0)  # one success: not yet healthy, but no second interval to wait
    clock.now += 1
    assert not ts.states[0].healthy
    assert order(ts) == [0, 1]
    succeed(ts, 0)
    assert ts.states[0].healthy
    assert order(ts) == [0, 1]


def test_trial_clocks_are_per_target(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    fail(ts, 0, 3)
    clock.now += 5
    fail(ts, 1, 3)
    clock.now += TRIAL_INTERVAL - 5  # target 0 is due, target 1 is not
    assert order(ts) == [0, 2, 1]
    clock.now += 5
    assert order(ts) == [1, 2, 0]


# ---------------------------------------------------------------- update

def test_update_keeps_the_health_of_targets_that_stayed(clock):
    ts = target_set(clock, "10.0.0.1:80", "10.0.0.2:80")
    fail(ts, 0, 3)
    new = Rule.from_dict({"rule_id": "r1", "listen_port": 10000,
                          "targets": ["10.0.0.9:80", "10.0.0.1:80"]})
    ts.update(new)
    assert [s.target.host for s in ts.states] == ["10.0.0.9", "10.0.0.1"]
    assert ts.states[0].healthy
    assert not ts.states[1].healthy and ts.states[1].index == 1
    clock.now += 1
    assert order(ts) == [0, 1]


def test_the_default_clock_is_the_loops():
    class LoopClock:
        now = 50.0

        def time(self):
            return self.now
    loop = LoopClock()
    rule = Rule.from_dict({"rule_id": "r1", "listen_port": 10000, "targets": ["10.0.0.1:80", "10.0.0.2:80"]})
    ts = TargetSet(rule, RuleCounters(rule.listen_ports), loop)
    fail(ts, 0, 3)
    loop.now += TRIAL_INTERVAL - 1
    assert order(ts) == [1, 0]
    loop.now += 1
    assert order(ts) == [0, 1]
