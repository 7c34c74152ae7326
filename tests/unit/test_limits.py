"""relay/limits.py with a hand-moved clock: buckets, admission order, parking, UDP drops, hot
updates, the registry and the splice predicate (SPEC §2.9)."""

from __future__ import annotations

import itertools

import pytest

from portunus.model import RateLimit, Rule, burst_bounds
from portunus.relay.limiter_book import LimiterBook
from portunus.relay.limits import NS, REJECT_REASONS, TokenBucket, Ticket, splice_allowed

T0 = 1000.0
GBIT10 = 10_000_000_000 // 8  # 10 Gbit/s in bytes per second


def cap(**kw) -> RateLimit:
    return RateLimit(**kw)


# ---------------------------------------------------------------- token bucket

def test_a_bucket_starts_full_and_refills_at_its_rate_up_to_the_burst():
    b = TokenBucket(100, 300, now=T0)
    assert b.take(1000, T0) == 300          # the whole burst, not more
    assert b.take(1, T0) == 0
    assert b.available(T0 + 0.5) == 50
    assert b.available(T0 + 10) == 300      # capped at the burst however long it idles


def test_the_default_burst_is_one_second_of_rate():
    b = TokenBucket(2048, now=T0)
    assert b.burst == 2048 and b.take(10_000, T0) == 2048


def test_partial_grants_and_exact_takes():
    b = TokenBucket(10, 10, now=T0)
    assert b.take(4, T0) == 4
    assert not b.take_exactly(7, T0)        # all or nothing leaves the level alone
    assert b.take_exactly(6, T0)
    assert b.available(T0) == 0


def test_one_byte_per_second_is_exact_over_a_day_of_small_steps():
    b = TokenBucket(1, 1, now=T0)
    assert b.take(1, T0) == 1
    got, t = 0, T0
    for _ in range(86_400 * 4):             # a quarter-second step: no rounding may leak or mint a byte
        t += 0.25
        got += b.take(1, t)
    assert got == 86_400


def test_wait_for_rounds_up_so_a_waker_never_finds_too_little():
    b = TokenBucket(3, 3, now=T0)
    b.take(3, T0)
    wait = b.wait_for(1, T0)
    assert wait == pytest.approx(1 / 3, abs=1e-9) and wait * 3 >= 1 - 1e-12
    assert b.wait_for(100, T0) == pytest.approx(1.0)   # capped at the burst: more never fits
    assert b.wait_for(0, T0) == 0.0
    assert b.available(T0 + wait) == 1


def test_ten_gigabit_is_exact_per_microsecond_and_per_hour():
    b = TokenBucket(GBIT10, now=T0)
    b.take(GBIT10, T0)
    assert b.available(T0 + 1e-6) == GBIT10 // 1_000_000        # 1250 bytes in a microsecond
    b.take(GBIT10, T0 + 1e-6)
    total, t = 0, T0 + 1e-6
    for _ in range(3600):
        t += 1.0
        total += b.take(GBIT10 * 2, t)
    assert total == GBIT10 * 3600
    assert b.wait_for(1, t) == pytest.approx(1 / GBIT10, abs=1e-9)


def test_a_clock_that_steps_back_refills_nothing_and_mints_nothing():
    b = TokenBucket(100, 100, now=T0)
    b.take(100, T0)
    assert b.available(T0 - 5) == 0
    assert b.available(T0 + 0.1) == 10


def test_buckets_refuse_nonsense_rates():
    for rate, burst in ((0, None), (-1, None), (True, None), (1.5, None), (10, 0)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst, now=T0)


def test_burst_bounds_follow_the_validation_range():
    assert burst_bounds(1) == (1, 60)
    assert burst_bounds(150) == (2, 9000)   # rate/100 = 1.5: the smallest whole burst is 2
    assert burst_bounds(10_000) == (100, 600_000)


# ---------------------------------------------------------------- hot update of one bucket

def test_raising_a_cap_mints_no_free_burst():
    b = TokenBucket(100, 100, now=T0)
    b.take(100, T0)
    b.update(10_000, 10_000, T0 + 0.5)      # 50 tokens accrued at the old rate, none from the new burst
    assert b.available(T0 + 0.5) == 50
    assert b.available(T0 + 0.51) == 150    # the new rate from the update on


def test_lowering_a_burst_trims_the_level():
    b = TokenBucket(100, 1000, now=T0)
    b.update(100, 10, T0)
    assert b.available(T0) == 10


# ---------------------------------------------------------------- parking: one timer per bucket

def test_many_parked_readers_share_one_timer_and_wake_in_order():
    b = TokenBucket(1000, 1000, now=T0)
    b.take(1000, T0)
    arm = [b.park(f"pump{i}", T0) for i in range(100)]
    assert arm[0] == pytest.approx(T0 + 0.01)   # 10 ms of rate: the wake quantum
    assert arm[1:] == [None] * 99               # everyone else rides on that one timer
    woken, rearm = b.due(arm[0], armed_for=arm[0])
    assert woken == ["pump0"]                    # 10 tokens serve one quantum: one reader per tick
    assert rearm == pytest.approx(arm[0] + 0.01) and b.timer_due == rearm
    assert b.take(100, arm[0]) == 10                # pump0 moves its quantum
    woken, rearm = b.due(T0 + 0.05, armed_for=rearm)    # a late tick: 40 tokens, four quanta
    assert woken == ["pump1", "pump2", "pump3", "pump4"]
    assert b.may_move("pump1") and not b.may_move("pump5")
    assert b.resume_all(T0 + 0.05) == [f"pump{i}" for i in range(5, 100)]
    assert b.waiters == {} and b.timer_due is None
    assert b.park("pump0", T0 + 0.05) is not None   # with no timer left, the next park arms one


def test_the_last_waiter_woken_leaves_no_timer():
    b = TokenBucket(100, 100, now=T0)
    b.take(100, T0)
    arm = b.park("only", T0)
    assert b.due(arm, armed_for=arm) == (["only"], None)
    assert b.timer_due is None and b.may_move("anyone")


def test_the_wake_quantum_is_one_token_at_tiny_rates_and_ten_ms_at_huge_ones():
    assert TokenBucket(1, 1, now=T0).wake_quantum() == 1
    assert TokenBucket(GBIT10, now=T0).wake_quantum() == GBIT10 // 100
    assert TokenBucket(10_000, 50, now=T0).wake_quantum() == 50   # never more than the burst


def test_throttle_seconds_count_while_someone_is_parked():
    b = TokenBucket(10, 10, now=T0)
    b.take(10, T0)
    b.park("a", T0)
    b.park("b", T0 + 0.05)
    assert b.throttle_seconds(T0 + 0.1) == pytest.approx(0.1)
    b.resume_all(T0 + 0.1)
    assert b.throttle_seconds(T0 + 5) == pytest.approx(0.1)     # nobody parked: no time accrues
    b.park("a", T0 + 5)
    b.unpark("a", T0 + 5.25)                                     # its connection closed
    assert b.throttle_seconds(T0 + 9) == pytest.approx(0.35)


# ---------------------------------------------------------------- the book: admission

def book_with(rule_cap=None, owner_cap=None, *, rules=("web",), owner="alice") -> LimiterBook:
    book = LimiterBook("edge-01")
    for rid in rules:
        book.set_rule(rid, owner=owner, cap=rule_cap, now=T0)
    if owner_cap is not None:
        book.set_owner_cap(owner, owner_cap, T0)
    return book


def test_a_connection_rate_of_two_with_burst_two_admits_exactly_two_then_two_per_second():
    book = book_with(cap(new_connections_per_sec=2, new_connections_burst=2))
    results = [book.admit("web", "tcp", T0) for _ in range(10)]
    assert sum(isinstance(r, Ticket) for r in results) == 2
    assert results[2:] == ["conn_rate"] * 8
    assert book.rules["web"].counters.rejects["conn_rate"] == 8
    later = [book.admit("web", "tcp", T0 + 1) for _ in range(5)]
    assert sum(isinstance(r, Ticket) for r in later) == 2


def test_udp_flows_are_refused_with_the_flow_reason():
    book = book_with(cap(new_connections_per_sec=1), cap(new_connections_per_sec=2), rules=("dns",))
    assert isinstance(book.admit("dns", "udp", T0), Ticket)
    assert book.admit("dns", "udp", T0) == "udp_flow_rate"     # the rule's one token is spent
    book.set_rule("dns", owner="alice", cap=None, now=T0)
    assert isinstance(book.admit("dns", "udp", T0), Ticket)    # the owner's second token
    assert book.admit("dns", "udp", T0) == "owner_udp_flow_rate"


def test_concurrency_is_released_by_the_ticket_exactly_once():
    book = book_with(cap(concurrent_connections=2))
    a, b = book.admit("web", "tcp", T0), book.admit("web", "tcp", T0)
    assert book.admit("web", "tcp", T0) == "conn_concurrent"
    a.release(T0)
    a.release(T0)                              # a second close gives back nothing more
    assert book.rules["web"].concurrent == 1
    c = book.admit("web", "tcp", T0)
    assert isinstance(c, Ticket)
    assert book.admit("web", "tcp", T0) == "conn_concurrent"
    b.release(T0), c.release(T0)
    assert book.rules["web"].concurrent == 0 and book.owner_active("alice") == 0


def test_an_uncapped_ownerless_rule_is_admitted_counted_and_released_and_a_later_cap_binds():
    """The fast path (nothing can refuse) still counts live connections, so a cap installed by a
    hot update sees the connections already live."""
    book = LimiterBook("c1")
    book.set_rule("open", owner=None, cap=None, now=T0)
    live = [book.admit("open", "tcp", T0) for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in live)
    assert book.rules["open"].concurrent == 3
    assert not live[0].bandwidth_capped and live[0].allowance("in", 1000, T0) == 1000
    book.set_rule("open", owner=None, cap=cap(concurrent_connections=3), now=T0)
    assert book.admit("open", "tcp", T0) == "conn_concurrent"
    for t in live:
        t.release(T0)
        t.release(T0)  # once only
    assert book.rules["open"].concurrent == 0
    assert isinstance(book.admit("open", "tcp", T0), Ticket)
    assert book.rules["open"].counters.rejects["conn_concurrent"] == 1


def test_the_owner_envelope_binds_before_the_rule_cap_and_spends_nothing_when_it_refuses():
    book = book_with(cap(concurrent_connections=1, new_connections_per_sec=1),
                     cap(concurrent_connections=1, new_connections_per_sec=1))
    assert isinstance(book.admit("web", "tcp", T0), Ticket)
    assert book.admit("web", "tcp", T0) == "owner_concurrent"   # both would refuse: the owner speaks


def test_the_owner_envelope_is_shared_by_the_owners_rules():
    book = book_with(None, cap(concurrent_connections=3), rules=("web", "ssh"))
    book.set_rule("bob-web", owner="bob", cap=None, now=T0)
    tickets = [book.admit(r, "tcp", T0) for r in ("web", "ssh", "web")]
    assert all(isinstance(t, Ticket) for t in tickets)
    assert book.admit("ssh", "tcp", T0) == "owner_concurrent"
    assert book.rules["ssh"].counters.rejects["owner_concurrent"] == 1
    assert isinstance(book.admit("bob-web", "tcp", T0), Ticket)  # another owner's rule is not in it
    tickets[0].release(T0)
    assert isinstance(book.admit("ssh", "tcp", T0), Ticket)


def test_a_rule_refusal_spends_no_owner_token():
    book = book_with(cap(concurrent_connections=1), cap(new_connections_per_sec=2, new_connections_burst=2))
    assert isinstance(book.admit("web", "tcp", T0), Ticket)
    for _ in range(5):
        assert book.admit("web", "tcp", T0) == "conn_concurrent"
    assert book.owners[("edge-01", "alice")].new_connections.available(T0) == 1


def test_every_reason_is_reachable():
    seen = set()
    for proto, owner_side, c in itertools.product(("tcp", "udp"), (False, True),
                                                  (cap(concurrent_connections=1), cap(new_connections_per_sec=1))):
        book = book_with(None, c) if owner_side else book_with(c)
        assert isinstance(book.admit("web", proto, T0), Ticket)
        seen.add(book.admit("web", proto, T0))
    assert seen == set(REJECT_REASONS)


def test_an_owner_cap_installed_later_counts_connections_already_live():
    book = book_with()
    live = [book.admit("web", "tcp", T0) for _ in range(3)]
    book.set_owner_cap("alice", cap(concurrent_connections=2), T0)
    assert book.admit("web", "tcp", T0) == "owner_concurrent"    # 3 live >= 2: refuse new, close none
    for t in live:
        t.release(T0)
    assert isinstance(book.admit("web", "tcp", T0), Ticket)


# ---------------------------------------------------------------- hot update through the book

def test_lowering_concurrency_below_the_live_count_refuses_new_and_closes_none():
    book = book_with(cap(concurrent_connections=5))
    live = [book.admit("web", "tcp", T0) for _ in range(5)]
    book.set_rule("web", owner="alice", cap=cap(concurrent_connections=2), now=T0)
    assert book.admit("web", "tcp", T0) == "conn_concurrent"
    assert all(not t.released for t in live) and book.rules["web"].concurrent == 5
    for t in live[:3]:
        t.release(T0)
    assert book.admit("web", "tcp", T0) == "conn_concurrent"     # 2 live, cap 2
    live[3].release(T0)
    assert isinstance(book.admit("web", "tcp", T0), Ticket)


def test_a_hot_update_keeps_the_bucket_and_raising_mints_nothing():
    book = book_with(cap(bandwidth_in_bps=1000))
    t = book.admit("web", "tcp", T0)
    assert t.grant("in", 5000, T0) == 1000
    bucket = book.rules["web"].bandwidth["in"]
    book.set_rule("web", owner="alice", cap=cap(bandwidth_in_bps=1_000_000), now=T0)
    assert book.rules["web"].bandwidth["in"] is bucket
    assert t.grant("in", 5000, T0) == 0                          # raising the cap minted no burst
    assert bucket.available(T0 + 0.001) == 1000                  # the new rate from the update on
    assert t.grant("in", 50_000, T0 + 0.01) == 10_000            # one wake quantum (10 ms) of it


def test_removing_a_bandwidth_cap_resumes_its_parked_readers():
    book = book_with(cap(bandwidth_out_bps=100))
    t = book.admit("web", "tcp", T0)
    t.grant("out", 100, T0)
    bucket, arm_at = t.park("out", "pump", T0)
    assert arm_at is not None
    woken = book.set_rule("web", owner="alice", cap=cap(concurrent_connections=10), now=T0 + 0.2)
    assert woken == ["pump"]
    assert t.grant("out", 1 << 20, T0 + 0.2) == 1 << 20          # uncapped now
    assert book.rules["web"].throttle_seconds("out", T0 + 9) == pytest.approx(0.2)


# ---------------------------------------------------------------- bandwidth: TCP and UDP

def test_tcp_grants_take_the_tightest_of_rule_and_owner_buckets():
    book = book_with(cap(bandwidth_in_bps=1000), cap(bandwidth_in_bps=300))
    t = book.admit("web", "tcp", T0)
    assert t.bandwidth_capped
    assert t.grant("in", 10_000, T0) == 300
    assert book.rules["web"].bandwidth["in"].available(T0) == 700   # both buckets debited
    assert t.grant("out", 10_000, T0) == 10_000                      # no out cap anywhere
    bucket, arm_at = t.park("in", "pump", T0)
    assert bucket is book.owners[("edge-01", "alice")].bandwidth["in"]   # the one that refills last
    assert arm_at == pytest.approx(T0 + 0.01)


def test_an_owner_rate_is_shared_by_two_rules_over_time():
    book = book_with(None, cap(bandwidth_in_bps=1000, bandwidth_in_burst=1000), rules=("web", "ssh"))
    a, b = book.admit("web", "tcp", T0), book.admit("ssh", "tcp", T0)
    moved = a.grant("in", 64 * 1024, T0) + b.grant("in", 64 * 1024, T0)
    for step in range(1, 1001):
        t = T0 + step * 0.01
        moved += a.grant("in", 64 * 1024, t) + b.grant("in", 64 * 1024, t)
    assert moved == 1000 + 1000 * 10     # the burst plus rate x 10 s, exactly


def test_udp_datagrams_pass_whole_or_drop_and_are_counted_per_direction():
    book = book_with(cap(bandwidth_in_bps=1500, bandwidth_in_burst=1500), rules=("dns",))
    flow = book.admit("dns", "udp", T0)
    assert flow.datagram("in", 1000, T0)
    assert not flow.datagram("in", 1000, T0)                    # 500 left: no partial datagram
    assert flow.datagram("in", 500, T0)
    assert flow.datagram("out", 65_000, T0)                     # out is uncapped
    counters = book.rules["dns"].counters
    assert (counters.bandwidth_dropped_in, counters.bandwidth_dropped_out) == (1, 0)


def test_an_owner_udp_drop_counts_on_the_rule_and_the_envelope():
    book = book_with(None, cap(bandwidth_out_bps=100, bandwidth_out_burst=100), rules=("dns",))
    flow = book.admit("dns", "udp", T0)
    assert not flow.datagram("out", 101, T0)
    assert book.rules["dns"].counters.bandwidth_dropped_out == 1
    assert book.owners[("edge-01", "alice")].counters.bandwidth_dropped_out == 1


# ---------------------------------------------------------------- registry lifecycle

def test_a_removed_rule_is_released_and_the_owner_cap_goes_with_the_last_rule():
    book = book_with(cap(bandwidth_in_bps=100), cap(concurrent_connections=5), rules=("web", "ssh"))
    assert book.remove_rule("web", T0) == []
    assert "web" not in book.rules and book.owner_cap("alice") is not None
    book.remove_rule("ssh", T0)
    assert book.owners == {} and book.owner_cap("alice") is None
    assert book.remove_rule("ssh", T0) == []                    # twice is harmless


def test_removing_a_rule_resumes_readers_parked_on_it():
    book = book_with(cap(bandwidth_in_bps=10))
    t = book.admit("web", "tcp", T0)
    t.grant("in", 10, T0)
    t.park("in", "pump", T0)
    assert book.remove_rule("web", T0) == ["pump"]
    t.release(T0)                                                  # a late close of a drained connection


def test_metric_samples_carry_the_spec_labels():
    book = book_with(cap(concurrent_connections=1, bandwidth_in_bps=10), cap(bandwidth_out_bps=10))
    t = book.admit("web", "tcp", T0)
    book.admit("web", "tcp", T0)
    t.grant("in", 10, T0)
    t.park("in", "pump", T0)
    m = book.metric_samples(T0 + 2)
    assert m["portunus_rate_limit_reject_total"] == [
        ({"client": "edge-01", "rule": "web", "owner": "alice", "reason": "conn_concurrent"}, 1)]
    assert ({"client": "edge-01", "rule": "", "owner": "alice"}, 1) in m["portunus_rate_limit_active_connections"]
    assert ({"client": "edge-01", "rule": "web", "owner": "alice"}, 1) in m["portunus_rate_limit_active_connections"]
    throttle = {(lab["rule"], lab["direction"]): v for lab, v in m["portunus_rate_limit_throttle_seconds_total"]}
    assert throttle == {("web", "in"): pytest.approx(2.0), ("", "out"): 0.0}


# ---------------------------------------------------------------- the splice predicate

def rule(protocol="tcp", rate_limit=None, owner="alice") -> Rule:
    return Rule.from_dict({"rule_id": "r", "protocol": protocol, "listen_port": 8080, "target": "127.0.0.1:80",
                           "rate_limit": rate_limit, "owner": owner})


BW_RULE = {"bandwidth_in_bps": 1000}
CONN_RULE = {"new_connections_per_sec": 5, "concurrent_connections": 10}


@pytest.mark.parametrize("linux,protocol,disabled,rule_caps,owner_caps", itertools.product(
    (True, False), ("tcp", "udp"), (False, True), (None, BW_RULE, CONN_RULE),
    (None, cap(bandwidth_out_bps=1), cap(concurrent_connections=1))))
def test_the_splice_predicate_truth_table(linux, protocol, disabled, rule_caps, owner_caps):
    expected = (linux and protocol == "tcp" and not disabled and rule_caps is not BW_RULE
                and not (owner_caps and owner_caps.bandwidth_out_bps))
    assert splice_allowed(rule(protocol, rule_caps), owner_caps, linux=linux, disabled=disabled) is expected


def test_the_book_decides_splice_with_the_owners_current_cap():
    book = book_with()
    r = rule()
    assert book.splice_allowed(r, linux=True, disabled=False)
    book.set_owner_cap("alice", cap(bandwidth_in_bps=NS), T0)
    assert not book.splice_allowed(r, linux=True, disabled=False)
    book.set_owner_cap("alice", cap(new_connections_per_sec=3), T0)   # hot update to a connection cap
    assert book.splice_allowed(r, linux=True, disabled=False)


# ---------------------------------------------------------------- timers and parked readers across changes

def test_a_reader_queues_behind_parked_readers_and_never_moves_a_trickle():
    book = book_with(cap(bandwidth_in_bps=10_000))
    a, b = book.admit("web", "tcp", T0), book.admit("web", "tcp", T0)
    assert a.grant("in", 10_000, T0) == 10_000
    bucket, arm_at = b.park("in", "pump-b", T0)
    assert arm_at == pytest.approx(T0 + 0.01)
    assert a.allowance("in", 10_000, T0 + 0.02) == 0             # 200 bytes are there, but b waits first
    assert bucket.due(arm_at + 0.01, armed_for=arm_at) == (["pump-b"], None)
    assert b.allowance("in", 10_000, T0 + 0.02) == 200
    b.spend("in", 200, T0 + 0.02)
    assert a.allowance("in", 10_000, T0 + 0.025) == 0            # 50 bytes < 10 ms of rate: park instead
    assert a.allowance("in", 30, T0 + 0.025) == 30               # unless that is all the reader wants


def test_allowance_takes_nothing_until_the_read_says_what_it_moved():
    book = book_with(cap(bandwidth_in_bps=1000))
    t = book.admit("web", "tcp", T0)
    assert t.allowance("in", 4096, T0) == 1000
    assert t.allowance("in", 4096, T0) == 1000     # a peek, not a take
    t.spend("in", 300, T0)                         # the socket had only 300 bytes
    assert t.allowance("in", 4096, T0) == 700


def test_a_stale_timer_resumes_nobody_so_a_bucket_never_runs_two_timers():
    book = book_with(cap(bandwidth_in_bps=100))
    t = book.admit("web", "tcp", T0)
    t.grant("in", 100, T0)
    bucket, first = t.park("in", "pump", T0)
    woken = book.set_rule("web", owner="alice", cap=cap(bandwidth_in_bps=10_000), now=T0 + 0.001)
    assert woken == ["pump"]                       # the faster rate must not wait for the old timer
    assert t.allowance("in", 10_000, T0 + 0.001) == 0
    _, second = t.park("in", "pump", T0 + 0.001)
    assert second is not None and second != first
    assert bucket.due(first, armed_for=first) == ([], None)    # the old timer fires: stale
    assert bucket.due(second, armed_for=second) == (["pump"], None)
    assert t.allowance("in", 10_000, second) >= 1


def test_an_unchanged_hot_update_leaves_parked_readers_alone():
    book = book_with(cap(bandwidth_in_bps=100, concurrent_connections=5))
    t = book.admit("web", "tcp", T0)
    t.grant("in", 100, T0)
    t.park("in", "pump", T0)
    assert book.set_rule("web", owner="alice", cap=cap(bandwidth_in_bps=100, concurrent_connections=9),
                         now=T0) == []


def test_closing_a_parked_connection_leaves_the_waiter_list():
    book = book_with(cap(bandwidth_out_bps=100))
    t = book.admit("web", "tcp", T0)
    t.grant("out", 100, T0)
    bucket, _ = t.park("out", "pump", T0)
    t.release(T0 + 0.5)
    assert bucket.waiters == {} and bucket.due(T0 + 1) == ([], None)
    assert bucket.throttle_seconds(T0 + 3) == pytest.approx(0.5)


# ---------------------------------------------------------------- a simulated relay on a fake loop

class FakeLoop:
    """Timers on a heap and a clock that jumps to the next timer: the relay's side of the contract."""

    def __init__(self, now: float = T0):
        self.now, self.timers, self.armed = now, [], 0

    def call_at(self, when: float, fn, *args) -> None:
        import heapq
        self.armed += 1
        heapq.heappush(self.timers, (when, self.armed, fn, args))

    def run_until(self, end: float) -> None:
        import heapq
        while self.timers and self.timers[0][0] <= end:
            when, _, fn, args = heapq.heappop(self.timers)
            self.now = max(self.now, when)
            fn(*args)
        self.now = end


class Pump:
    """A read half that always has data: moves up to a 64 KiB chunk when allowed, else parks."""

    CHUNK = 64 * 1024

    def __init__(self, loop: FakeLoop, ticket: Ticket, direction: str = "in"):
        self.loop, self.ticket, self.direction, self.moved, self.reads = loop, ticket, direction, 0, 0

    def on_readable(self) -> None:
        self.reads += 1
        n = self.ticket.allowance(self.direction, self.CHUNK, self.loop.now)
        if n:
            self.ticket.spend(self.direction, n, self.loop.now)
            self.moved += n
            self.loop.call_at(self.loop.now, self.on_readable)   # the next chunk is already there
            return
        bucket, arm_at = self.ticket.park(self.direction, self, self.loop.now)
        if arm_at is not None:
            self.loop.call_at(arm_at, wake, self.loop, bucket, arm_at)


def wake(loop: FakeLoop, bucket: TokenBucket, armed_for: float) -> None:
    woken, rearm = bucket.due(loop.now, armed_for=armed_for)
    if rearm is not None:
        loop.call_at(rearm, wake, loop, bucket, rearm)
    for pump in woken:
        pump.on_readable()


@pytest.mark.parametrize("rate", [1 << 20, 100_000_000 // 8, 1_000_000_000 // 8])
def test_a_capped_pump_moves_rate_times_time_plus_burst(rate):
    loop = FakeLoop()
    book = book_with(cap(bandwidth_in_bps=rate))
    pump = Pump(loop, book.admit("web", "tcp", T0))
    pump.on_readable()
    loop.run_until(T0 + 10)
    expected = rate * 10 + rate
    assert expected - book.rules["web"].bandwidth["in"].wake_quantum() - Pump.CHUNK <= pump.moved <= expected


def test_a_thousand_parked_pumps_share_one_timer_per_bucket():
    loop = FakeLoop()
    book = book_with(cap(bandwidth_in_bps=1 << 20), rules=("web",))
    pumps = [Pump(loop, book.admit("web", "tcp", T0)) for _ in range(1000)]
    for p in pumps:
        p.on_readable()
    bucket = book.rules["web"].bandwidth["in"]
    assert len(bucket.waiters) >= 900
    pending_wakes = [t for t in loop.timers if t[2] is wake]
    assert len(pending_wakes) == 1
    loop.run_until(T0 + 5)
    assert (1 << 20) * 6 - Pump.CHUNK <= sum(p.moved for p in pumps) <= (1 << 20) * 6
    assert len([t for t in loop.timers if t[2] is wake]) <= 1
    # a tick resumes the few readers its tokens serve, not all thousand: ~100 ticks/s x 5 s
    assert sum(p.reads for p in pumps) - 1000 < 5 * 100 * 4
    assert sum(1 for p in pumps if p.moved) > 400          # and the queue turns round-robin


def test_idle_capped_connections_arm_no_timer():
    loop = FakeLoop()
    book = book_with(cap(bandwidth_in_bps=1000, bandwidth_out_bps=1000), cap(bandwidth_in_bps=500))
    tickets = [book.admit("web", "tcp", T0) for _ in range(1000)]
    loop.run_until(T0 + 10)
    assert loop.timers == [] and all(isinstance(t, Ticket) for t in tickets)
    assert book.rules["web"].bandwidth["in"].timer_due is None


def test_an_owner_envelope_splits_its_rate_between_two_rules():
    loop = FakeLoop()
    book = book_with(None, cap(bandwidth_in_bps=1 << 20), rules=("web", "ssh"))
    a, b = Pump(loop, book.admit("web", "tcp", T0)), Pump(loop, book.admit("ssh", "tcp", T0))
    a.on_readable(), b.on_readable()
    loop.run_until(T0 + 10)
    assert (1 << 20) * 11 - 2 * Pump.CHUNK <= a.moved + b.moved <= (1 << 20) * 11
    assert min(a.moved, b.moved) > (1 << 20) * 3     # neither starves
