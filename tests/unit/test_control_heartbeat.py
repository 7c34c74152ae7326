"""Hub heartbeat: the ping round is spread over PING_INTERVAL in slices (issue 15), and every
session is still pinged once per interval and closed once silent for DEAD_AFTER (injected clock)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from portunus.control import hub as hub_mod
from portunus.control.hub import ClientSession, Hub


class FakeLoop:
    def __init__(self):
        self.now = 1000.0
        self.timers: list[tuple[float, object, tuple]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay, cb, *args):
        self.timers.append((self.now + delay, cb, args))
        return SimpleNamespace(cancel=lambda: None)

    def run_due(self) -> None:
        """Advance to the next timer and run it."""
        self.timers.sort(key=lambda t: t[0])
        when, cb, args = self.timers.pop(0)
        self.now = when
        cb(*args)


class FakeChannel:
    def __init__(self, loop: FakeLoop):
        self.peer = "127.0.0.1:5555"
        self.sent: list[dict] = []
        self.closed_with: str | None = None
        self.last_rx = loop.time()
        self.context: dict = {}

    def send(self, msg: dict) -> bool:
        self.sent.append(msg)
        return True

    def close(self, reason: str = "closed", flush: bool = True) -> None:
        self.closed_with = reason


@pytest.fixture
def setup():
    loop = FakeLoop()
    h = Hub(loop, None, None, SimpleNamespace())
    sessions = []
    for i in range(40):
        s = ClientSession({"client_id": f"C{i}", "client_name": f"edge-{i}"}, FakeChannel(loop), {"capabilities": []})
        h.sessions[s.client_id] = s
        sessions.append(s)
    loop.call_later(hub_mod.PING_INTERVAL / hub_mod.HEARTBEAT_SLICES, h._heartbeat)  # what listen() arms
    yield loop, h, sessions
    h.offload.close()


def pings(s: ClientSession) -> int:
    return sum(1 for msg in s.channel.sent if msg["type"] == "ping")


def test_every_session_is_pinged_once_per_interval_in_slices_not_all_at_once(setup):
    loop, h, sessions = setup
    start = loop.now
    per_tick = []
    for _ in range(hub_mod.HEARTBEAT_SLICES):
        before = sum(pings(s) for s in sessions)
        for s in sessions:
            s.channel.last_rx = loop.now  # every peer answers
        loop.run_due()
        per_tick.append(sum(pings(s) for s in sessions) - before)
    assert loop.now - start == pytest.approx(hub_mod.PING_INTERVAL)
    assert [pings(s) for s in sessions] == [1] * len(sessions)  # one round: each exactly once
    assert max(per_tick) <= math.ceil(len(sessions) / hub_mod.HEARTBEAT_SLICES)
    assert sum(1 for n in per_tick if n) > 1  # spread, not one burst
    for _ in range(hub_mod.HEARTBEAT_SLICES):  # the next round pings each once more
        for s in sessions:
            s.channel.last_rx = loop.now
        loop.run_due()
    assert [pings(s) for s in sessions] == [2] * len(sessions)
    assert all(s.channel.closed_with is None for s in sessions)
    assert len(loop.timers) == 1  # the heartbeat re-arms itself, once


def test_a_silent_session_is_closed_at_its_slice_within_one_interval_of_dead_after(setup):
    loop, h, sessions = setup
    silent = sessions[7]
    deadline = None
    while silent.channel.closed_with is None:
        for s in sessions:
            if s is not silent:
                s.channel.last_rx = loop.now
        loop.run_due()
        if deadline is None and loop.now - silent.channel.last_rx > hub_mod.DEAD_AFTER:
            deadline = loop.now
        assert loop.now < 1000.0 + hub_mod.DEAD_AFTER + 2 * hub_mod.PING_INTERVAL
    assert silent.channel.closed_with == "peer silent for 45 s"
    assert loop.now - silent.channel.last_rx > hub_mod.DEAD_AFTER
    assert loop.now - deadline <= hub_mod.PING_INTERVAL
    assert all(s.channel.closed_with is None for s in sessions if s is not silent)


def test_after_a_storm_of_sessions_the_free_heap_is_handed_back_off_the_loop_at_most_every_trim_every(setup):
    loop, h, sessions = setup
    ran = []
    h.offload.run = lambda fn, *args, then=None: ran.append(fn)
    h._churn = hub_mod.TRIM_AFTER_CHURN - 1
    h._trimmed_at = loop.now - hub_mod.TRIM_EVERY  # the last trim was long enough ago
    loop.run_due()
    assert ran == []  # not enough churn yet
    h._churn += 1
    loop.run_due()
    assert ran == [hub_mod.release_free_heap] and h._churn == 0
    h._churn = 10 * hub_mod.TRIM_AFTER_CHURN
    for _ in range(5):  # within TRIM_EVERY of the last trim: none
        loop.run_due()
    assert ran == [hub_mod.release_free_heap]
    h._trimmed_at -= hub_mod.TRIM_EVERY
    loop.run_due()
    assert ran == [hub_mod.release_free_heap] * 2


def test_release_free_heap_runs_where_glibc_is_and_says_so():
    first = hub_mod.release_free_heap()
    assert isinstance(first, bool)
    assert hub_mod.release_free_heap() is first  # the lookup is done once
