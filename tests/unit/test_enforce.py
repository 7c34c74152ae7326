"""relay/enforce.py on a fake loop (no sockets, no sleeps): one refill timer per bucket, resumes
after hot updates, admission with the quota first, the cut at exhaustion, the splice decision."""

from __future__ import annotations

import heapq
import itertools

import pytest

from portunus.model import RateLimit, Rule
from portunus.relay.enforce import QUOTA_REFUSED, Enforcer


class FakeLoop:
    def __init__(self):
        self.now = 100.0
        self.timers: list = []
        self.ready: list = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_soon(self, cb, *args):
        self.ready.append((cb, args))

    def call_at(self, when, cb, *args):
        heapq.heappush(self.timers, (when, next(self._seq), cb, args))

    def run(self, until: float | None = None) -> None:
        """Run what is ready, then every timer due up to ``until`` (moving the clock)."""
        while True:
            while self.ready:
                cb, args = self.ready.pop(0)
                cb(*args)
            if not self.timers or until is None or self.timers[0][0] > until:
                break
            when, _, cb, args = heapq.heappop(self.timers)
            self.now = max(self.now, when)
            cb(*args)
        if until is not None:
            self.now = max(self.now, until)


class Reader:
    def __init__(self, name):
        self.name, self.resumed = name, 0

    def resume(self):
        self.resumed += 1


class Member:
    def __init__(self):
        self.cuts = []

    def cut(self, why):
        self.cuts.append(why)


def rule(rule_id="r", owner="alice", **caps) -> Rule:
    return Rule.from_dict({"rule_id": rule_id, "listen_port": 8000, "target": "127.0.0.1:80", "owner": owner,
                           **({"rate_limit": caps} if caps else {})})


@pytest.fixture
def env():
    loop = FakeLoop()
    return loop, Enforcer(loop, "edge-01")


def quota_state(remaining, exhausted=False):
    return {"user_id": "alice", "client_id": "edge-01", "action": "set",
            "state": {"monthly_bytes": 1000, "budget_remaining_bytes": remaining, "period_started_at": 0,
                      "period_ends_at": 10, "exhausted": exhausted}}


def test_readers_parked_on_one_bucket_share_one_refill_timer(env):
    loop, enf = env
    r = rule(bandwidth_in_bps=1000)
    enf.set_rule(r)
    readers = [Reader(i) for i in range(3)]
    tickets = []
    for reader in readers:
        ticket, _ = enf.admit(r, "tcp")
        tickets.append(ticket)
    tickets[0].spend("in", tickets[0].allowance("in", 5000, loop.now), loop.now)  # the burst is gone
    for ticket, reader in zip(tickets, readers):
        assert ticket.allowance("in", 5000, loop.now) == 0
        enf.park(ticket, "in", reader)
    assert len(loop.timers) == 1  # one timer per bucket, not per reader
    loop.run(until=loop.now + 0.011)  # ~10 ms of rate: a quantum for the first in the queue
    assert [x.resumed for x in readers] == [1, 0, 0]
    assert len(loop.timers) == 1  # re-armed for the rest: still one
    loop.run(until=loop.now + 1.0)
    assert all(x.resumed == 1 for x in readers)
    assert loop.timers == []  # nobody parked: no timer spinning


def test_a_hot_update_resumes_parked_readers_and_leaves_the_old_timer_stale(env):
    loop, enf = env
    r = rule(bandwidth_in_bps=1000)
    enf.set_rule(r)
    ticket, _ = enf.admit(r, "tcp")
    ticket.spend("in", 1000, loop.now)
    reader = Reader("a")
    enf.park(ticket, "in", reader)
    enf.set_rule(rule(bandwidth_in_bps=2000))  # a new rate: the timer was for the old one
    loop.run()
    assert reader.resumed == 1
    loop.run(until=loop.now + 5)
    assert reader.resumed == 1  # the stale timer woke nobody
    enf.set_rule(rule())  # the cap goes: bandwidth no longer parks
    assert not ticket.bandwidth_capped


def test_an_owner_envelope_installed_later_caps_admitted_connections(env):
    loop, enf = env
    r = rule()
    enf.set_rule(r)
    ticket, _ = enf.admit(r, "tcp")
    assert ticket.allowance("out", 10_000, loop.now) == 10_000
    enf.set_owner_cap("alice", RateLimit.from_dict({"bandwidth_out_bps": 1000}))
    assert ticket.bandwidth_capped and ticket.allowance("out", 10_000, loop.now) == 1000
    enf.remove_owner_cap("alice")
    assert not ticket.bandwidth_capped


def test_admission_asks_the_quota_first_and_consumes_nothing_when_refused(env):
    loop, enf = env
    r = rule(new_connections_per_sec=1)
    enf.set_rule(r)
    enf.quotas.apply_update(quota_state(0, exhausted=True))
    assert enf.admit(r, "tcp") == QUOTA_REFUSED
    enf.quotas.apply_update(quota_state(500))
    ticket, quota = enf.admit(r, "tcp")  # the token was not spent by the refusal
    assert quota.user_id == "alice" and quota.remaining == 500
    assert enf.admit(r, "tcp") == "conn_rate"
    assert enf.limits.rules["r"].counters.rejects["conn_rate"] == 1
    ownerless = rule("x", owner=None)
    assert enf.admit(ownerless, "udp")[1] is None  # no owner: never metered (and set up on demand)


def test_exhaustion_cuts_the_pairs_members_from_the_loop_and_calls_the_hooks(env):
    loop, enf = env
    r = rule()
    enf.set_rule(r)
    enf.quotas.apply_update(quota_state(100))
    hooked = []
    enf.exhaustion_hooks.append(hooked.append)
    members = [Member(), Member()]
    for m in members:
        _, quota = enf.admit(r, "tcp")
        enf.join(quota, m)
    enf.leave(quota, members[1])
    quota.debit(100)  # the last byte: exhausted inside a pump
    assert members[0].cuts == [] and hooked == []  # nothing from under the pump
    loop.run()
    assert members[0].cuts == ["traffic quota exhausted"] and members[1].cuts == []
    assert [h.user_id for h in hooked] == ["alice"]


def test_a_fresh_state_before_the_cut_runs_cancels_it(env):
    loop, enf = env
    r = rule()
    enf.set_rule(r)
    enf.quotas.apply_update(quota_state(10))
    member = Member()
    _, quota = enf.admit(r, "tcp")
    enf.join(quota, member)
    quota.debit(10)
    quota.mark_reported()
    enf.quotas.apply_update(quota_state(500))
    loop.run()
    assert member.cuts == []


def test_the_splice_decision_follows_caps_and_the_switch(env, monkeypatch):
    loop, enf = env
    monkeypatch.setattr("portunus.relay.enforce._LINUX_SPLICE", True)  # as on Linux, wherever this runs
    monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE", raising=False)
    plain, conn_capped = rule(), rule("c", concurrent_connections=5, new_connections_per_sec=10)
    assert enf.splice_allowed(plain) and enf.splice_allowed(conn_capped)
    assert not enf.splice_allowed(rule("b", bandwidth_in_bps=10))
    enf.set_owner_cap("alice", RateLimit.from_dict({"bandwidth_out_bps": 10}))
    assert not enf.splice_allowed(plain)
    enf.remove_owner_cap("alice")
    monkeypatch.setenv("PORTUNUS_DISABLE_SPLICE", "1")
    assert not enf.splice_allowed(plain)
    udp = Rule.from_dict({"rule_id": "u", "protocol": "udp", "listen_port": 8000, "target": "127.0.0.1:80"})
    monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE")
    assert not enf.splice_allowed(udp)


def test_snapshots_of_a_rule_and_of_owner_envelopes(env):
    loop, enf = env
    r = rule(bandwidth_in_bps=1000, concurrent_connections=1)
    enf.set_rule(r)
    ticket, _ = enf.admit(r, "tcp")
    assert enf.admit(r, "tcp") == "conn_concurrent"
    ticket.spend("in", 1000, loop.now)
    enf.park(ticket, "in", Reader("a"))
    loop.now += 2
    snap = enf.rule_snapshot("r")
    assert snap["rejects"]["conn_concurrent"] == 1 and snap["active"] == 1
    assert snap["throttling"] == ["in"] and snap["throttle_seconds"] == {"in": 2.0, "out": 0.0}
    assert enf.rule_snapshot("nope") is None and enf.owner_snapshots() == []
    enf.set_owner_cap("alice", RateLimit.from_dict({"concurrent_connections": 3}))
    assert enf.owner_snapshots() == [{"owner": "alice", "active": 1, "throttle_seconds": {"in": 0.0, "out": 0.0},
                                      "bandwidth_dropped_in": 0, "bandwidth_dropped_out": 0}]
