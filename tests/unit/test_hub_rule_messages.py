"""Hub: a session's messages about rules count only for the rules that client owns (issue 8 point 1)."""

from __future__ import annotations

import concurrent.futures
import io
import json
from types import SimpleNamespace

import pytest

from portunus.control import hub as hub_mod
from portunus.control.hub import ClientSession, Hub
from portunus.control.stats_report import RuleShape
from portunus.log import log


class FakeLoop:
    def __init__(self):
        self.delays: list[float] = []

    def time(self) -> float:
        return 100.0

    def call_later(self, delay, cb, *args):
        self.delays.append(delay)  # run at once: the tests count what would be stored
        cb(*args)


class FakeChannel:
    def __init__(self):
        self.peer = "127.0.0.1:5555"
        self.sent: list[dict] = []
        self.closed = False
        self.context: dict = {}

    def send(self, msg: dict) -> bool:
        self.sent.append(msg)
        return True


@pytest.fixture
def logbuf(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    monkeypatch.setattr(log, "_limited", type(log._limited)())
    return buf


@pytest.fixture
def hub(logbuf):
    h = Hub(FakeLoop(), None, None, SimpleNamespace())
    h.persisted = []
    h.offload.run = lambda fn, *args, then=None: h.persisted.append(fn)
    h.reports = []
    h.stats_sink = lambda client_id, report: h.reports.append((client_id, report))
    yield h
    h.offload.close()


@pytest.fixture
def session(hub):
    s = ClientSession({"client_id": "C2", "client_name": "edge-02"}, FakeChannel(), {"capabilities": []})
    s.rules = {"own": RuleShape(8000, 8001, 1)}
    s.sent_requests = {"own": "req-1"}
    hub.sessions["C2"] = s
    return s


def status(rule_id, state="failed", request_id=None) -> dict:
    return {"type": "rule_status", "rule_id": rule_id, "state": state, "reason": "x", "request_id": request_id}


def events(buf, name) -> list[dict]:
    return [r for r in map(json.loads, buf.getvalue().splitlines()) if r["event"] == name]


def test_status_about_another_clients_rule_is_dropped_counted_and_logged_once(hub, session, logbuf):
    waiter = concurrent.futures.Future()
    session.waiters["victim"] = [waiter]  # cannot happen for real; proves nothing resolves either
    for _ in range(3):
        hub._on_rule_status(session, status("victim"))
    assert hub.persisted == [] and not waiter.done()
    assert hub.rejected_message_counts() == {"rule_not_owned": 3}
    [ev] = events(logbuf, "control.message_rejected")
    assert ev["reason"] == "rule_not_owned" and ev["client_id"] == "C2" and "victim" in ev["detail"]


@pytest.mark.parametrize("request_id,accepted", [(None, True), ("req-1", True), ("req-0", False)])
def test_status_request_id_must_be_one_the_server_sent(hub, session, request_id, accepted):
    waiter = concurrent.futures.Future()
    session.waiters["own"] = [waiter]
    hub._on_rule_status(session, status("own", "active", request_id))
    assert waiter.done() is accepted
    assert len(hub.persisted) == (1 if accepted else 0)
    assert hub.rejected_message_counts() == ({} if accepted else {"request_id_unknown": 1})


def test_push_and_remove_keep_the_owned_set_and_request_ids(hub, session):
    hub.push_rule("C2", {"rule_id": "new", "listen_port": 9000, "targets": [{}, {}]}, "req-2")
    assert session.rules["new"] == RuleShape(9000, 9000, 2) and session.sent_requests["new"] == "req-2"
    assert hub.remove_rule("C2", "new", "req-3")
    assert not session.owns("new")
    hub._on_rule_status(session, status("new", "removed", "req-3"))
    assert "new" not in session.removing and hub.rejected_message_counts() == {}
    hub._on_rule_status(session, status("new", "active"))  # gone: nothing more about it counts
    assert hub.rejected_message_counts() == {"rule_not_owned": 1}


def test_stats_keep_only_clean_snapshots_of_owned_rules(hub, session):
    hub._on_stats_report(session, {"type": "stats_report", "at": 5.0, "rules": [
        {"rule_id": "own", "bytes_in": 1, "per_port": [{"listen_port": 8001, "bytes_in": 1}]},
        {"rule_id": "victim", "bytes_in": 999},
        {"rule_id": "own", "bytes_in": "999"},
        {"rule_id": "own", "per_port": [{"listen_port": 7}]},
    ] + [{"rule_id": f"inv-{i}"} for i in range(1000)]})
    [(client_id, report)] = hub.reports
    assert client_id == "C2" and report["at"] == 5.0
    assert [(s["rule_id"], s["bytes_in"]) for s in report["rules"]] == [("own", 1)]
    assert hub.rejected_message_counts() == {"stats_unknown_rule": 1001, "stats_bad_counter": 1, "stats_malformed": 1}


def test_stats_of_a_rule_removed_a_moment_ago_are_ignored_quietly(hub, session):
    hub.remove_rule("C2", "own", None)
    hub._on_stats_report(session, {"type": "stats_report", "at": 5.0, "rules": [{"rule_id": "own", "bytes_in": 1}]})
    assert hub.reports == [] and hub.rejected_message_counts() == {}


def test_stats_before_the_replay_loaded_the_rules_are_dropped(hub, session):
    session.rules = None
    hub._on_stats_report(session, {"type": "stats_report", "at": 5.0, "rules": [{"rule_id": "own"}]})
    assert hub.reports == [] and hub.rejected_message_counts() == {}


def test_removals_remembered_per_session_are_bounded(hub, session, monkeypatch):
    monkeypatch.setattr(hub_mod, "MAX_REMOVING", 3)
    for i in range(10):
        hub.remove_rule("C2", f"r{i}", None)
    assert list(session.removing) == ["r7", "r8", "r9"]


def test_a_repeated_status_nobody_waits_for_is_not_stored_again(hub, session, logbuf):
    for _ in range(50):
        hub._on_rule_status(session, status("own", "active"))
    assert len(hub.persisted) == 1 and len(events(logbuf, "rule.status")) == 1
    waiter = concurrent.futures.Future()
    session.waiters["own"] = [waiter]  # a new push waits: the same status resolves it
    hub._on_rule_status(session, status("own", "active"))
    assert waiter.done() and len(hub.persisted) == 2
    hub._on_rule_status(session, status("own", "failed"))
    assert len(hub.persisted) == 3


def test_an_acked_push_is_stored_by_its_waiter_and_only_checked_later_by_the_hub(hub, session):
    """No second write racing the HTTP thread's for SQLite's write lock (issue 15): with a waiter the hub
    only checks, PERSIST_CHECK_DELAY later, that the state is stored; without one it stores it at once."""
    calls = []
    hub.registry = SimpleNamespace(
        set_rule_state=lambda *a: calls.append(("set", a)),
        set_rule_state_unless_stored=lambda *a: calls.append(("unless_stored", a)))
    hub.offload.run = lambda fn, *args, then=None: fn(*args)
    waiter = concurrent.futures.Future()
    session.waiters["own"] = [waiter]
    hub._on_rule_status(session, status("own", "active", request_id="req-1"))
    assert waiter.done() and calls == [("unless_stored", ("own", "active", "x"))]
    assert hub.loop.delays == [hub_mod.PERSIST_CHECK_DELAY]
    hub._on_rule_status(session, status("own", "failed", request_id="req-1"))  # nobody waits now
    assert calls[-1] == ("set", ("own", "failed", "x")) and hub.loop.delays == [hub_mod.PERSIST_CHECK_DELAY]
