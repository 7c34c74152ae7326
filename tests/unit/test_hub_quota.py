"""Hub wiring of traffic quotas (issue 14): the replay order, pushes to connected clients only,
updates held while the replay loads, the client's exhaustion report, stats reports to the writer."""

from __future__ import annotations

import concurrent.futures
import io
import json
from types import SimpleNamespace

import pytest

from portunus.control import messages as m
from portunus.control.hub import ClientSession, Hub
from portunus.control.stats_report import RuleShape
from portunus.log import log
from portunus.model import Rule

STATE = {"monthly_bytes": 10, "budget_remaining_bytes": 10, "period_started_at": 1, "period_ends_at": 2,
         "exhausted": False}


class FakeLoop:
    def __init__(self):
        self.soon = []

    def time(self) -> float:
        return 100.0

    def call_soon_threadsafe(self, fn, *args):
        self.soon.append((fn, args))

    def run_soon(self):
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class FakeChannel:
    def __init__(self):
        self.peer = "127.0.0.1:5555"
        self.sent: list[dict] = []
        self.closed = False
        self.context: dict = {}

    def send(self, msg: dict) -> bool:
        self.sent.append(msg)
        return True


class Services:
    """Stands in for OwnerCapService / QuotaService / ReportWriter: records what the hub asks."""

    def __init__(self, replay):
        self.replay = replay
        self.calls = []

    def replay_messages(self, client_id):
        self.calls.append(("replay", client_id))
        return list(self.replay)

    def client_exhausted(self, user_id, client_id):
        self.calls.append(("exhausted", user_id, client_id))

    def enqueue_stats(self, client_id, received_at, rules):
        from portunus.server.traffic import report_from_stats
        self.calls.append(("report", report_from_stats(client_id, received_at, rules)))


def done(value) -> concurrent.futures.Future:
    fut = concurrent.futures.Future()
    fut.set_result(value)
    return fut


@pytest.fixture
def logbuf(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    monkeypatch.setattr(log, "_limited", type(log._limited)())
    return buf


class FakeRegistry:
    """The hub's ClientRegistry without a store: the rules a replay reads."""

    def __init__(self):
        self.rules: list[Rule] = []

    def record_connection(self, client_id, client_version, capabilities) -> None:
        pass

    def replay_rules(self, client_id) -> tuple[list[Rule], set[str]]:
        return list(self.rules), set()


@pytest.fixture
def hub(logbuf):
    cfg = SimpleNamespace(stats_report_interval_secs=5, udp_max_flows_per_rule=16, udp_flow_idle_secs=30)
    h = Hub(FakeLoop(), None, FakeRegistry(), cfg)
    h.deferred = []  # offloaded calls whose result the test delivers itself

    def run(fn, *args, then=None):
        h.deferred.append((fn, args, then))
    h.offload.run = run
    yield h
    h.offload.close()


def quota_set(user="alice", client="C1") -> dict:
    return m.traffic_quota_update(user, client, "set", STATE)


def cap_set(owner="alice", client="C1") -> dict:
    return m.owner_rate_limit_update(client, owner, "set", {"bandwidth_in_bps": 1000})


def connect(hub, caps=("traffic_quota", "rate_limit")) -> tuple[ClientSession, FakeChannel]:
    ch = FakeChannel()
    hub._admit(ch, {"client_id": "C1", "client_name": "edge-tokyo"},
               {"capabilities": list(caps), "client_version": "1.4.0"})
    return ch.context["session"], ch


def finish_replay(hub, monkeypatch, rules=()):
    """Run the offloaded replay read (from the fake registry) and deliver it on the 'loop'."""
    hub.registry.rules = list(rules)
    for fn, args, then in list(hub.deferred):
        if then is not None and fn.__name__ == "replayable":
            hub.deferred.remove((fn, args, then))
            then(done(fn(*args)))


def types(sent) -> list[str]:
    return [msg["type"] + (":" + msg["action"] if "action" in msg else "") for msg in sent]


def rule(rule_id="R1", port=18000) -> Rule:
    return Rule.from_dict({"rule_id": rule_id, "listen_port": port, "target": "127.0.0.1:9", "owner": "alice"})


def test_replay_sends_owner_caps_then_quotas_then_rules(hub, monkeypatch):
    hub.owner_caps, hub.quotas = Services([cap_set()]), Services([quota_set()])
    session, ch = connect(hub)
    finish_replay(hub, monkeypatch, rules=[rule()])
    assert types(ch.sent) == ["welcome", "owner_rate_limit_update:set", "traffic_quota_update:set",
                              "rule_update:push", "replay_done"]
    assert hub.quotas.calls == [("replay", "C1")] and session.replayed


def test_replay_leaves_out_updates_the_client_cannot_take(hub, monkeypatch, logbuf):
    hub.owner_caps, hub.quotas = Services([cap_set()]), Services([quota_set()])
    _, ch = connect(hub, caps=("udp",))
    finish_replay(hub, monkeypatch)
    assert types(ch.sent) == ["welcome", "replay_done"]
    [warning] = [json.loads(line) for line in logbuf.getvalue().splitlines()
                 if json.loads(line)["event"] == "control.updates_not_supported"]
    assert warning["types"] == ["owner_rate_limit_update", "traffic_quota_update"] and warning["client_id"] == "C1"


def test_update_published_while_the_replay_loads_follows_the_replayed_state(hub, monkeypatch):
    hub.quotas = Services([quota_set()])
    _, ch = connect(hub)
    newer = m.traffic_quota_update("alice", "C1", "set", {**STATE, "exhausted": True, "budget_remaining_bytes": 0})
    hub.post_update("C1", newer)
    hub.loop.run_soon()
    assert types(ch.sent) == ["welcome"]  # held: the replay has not sent the older state yet
    finish_replay(hub, monkeypatch, rules=[rule()])
    assert types(ch.sent) == ["welcome", "traffic_quota_update:set", "traffic_quota_update:set",
                              "rule_update:push", "replay_done"]
    assert ch.sent[2] == newer


def test_post_update_reaches_a_connected_client_on_the_loop_only(hub, monkeypatch):
    hub.quotas = Services([])
    _, ch = connect(hub)
    finish_replay(hub, monkeypatch)
    hub.post_update("C1", m.traffic_quota_update("alice", "C1", "remove"))
    assert types(ch.sent) == ["welcome", "replay_done"]  # nothing sent from the calling thread
    hub.loop.run_soon()
    assert types(ch.sent)[-1] == "traffic_quota_update:remove"


def test_post_update_to_an_offline_or_old_client_sends_nothing(hub, monkeypatch):
    hub.post_update("NOBODY", quota_set(client="NOBODY"))
    hub.loop.run_soon()
    _, ch = connect(hub, caps=("udp",))
    finish_replay(hub, monkeypatch)
    hub.post_update("C1", quota_set())
    hub.loop.run_soon()
    assert types(ch.sent) == ["welcome", "replay_done"]


def test_client_exhaustion_report_marks_its_own_pair(hub, monkeypatch):
    hub.quotas = Services([])
    session, _ = connect(hub)
    hub._on_message(session.channel, m.traffic_quota_exhausted("alice", "C1", 1700000000.0))
    [(fn, args, then)] = [d for d in hub.deferred if d[0] == hub.quotas.client_exhausted]
    assert args == ("alice", "C1")


def test_exhaustion_report_about_another_client_is_rejected(hub, logbuf):
    hub.quotas = Services([])
    session, _ = connect(hub)
    hub._on_message(session.channel, m.traffic_quota_exhausted("alice", "OTHER", 1700000000.0))
    assert not [d for d in hub.deferred if d[0] == hub.quotas.client_exhausted]
    assert hub.rejected_message_counts() == {"quota_not_owned": 1}
    assert any(json.loads(line)["event"] == "control.message_rejected" for line in logbuf.getvalue().splitlines())


def test_validated_stats_reports_go_to_the_report_writer(hub):
    writer = hub.report_writer = Services([])
    session = ClientSession({"client_id": "C1", "client_name": "edge-tokyo"}, FakeChannel(), {"capabilities": []})
    session.rules = {"R1": RuleShape(18000, 18000, 1)}
    hub._on_stats_report(session, m.stats_report([{"rule_id": "R1", "bytes_in": 7, "bytes_out": 5},
                                                  {"rule_id": "NOT-MINE", "bytes_in": 1 << 30}], 1700000000.0))
    [(_, report)] = writer.calls
    assert report.client_id == "C1" and report.received_at > 1700000000
    assert [(r.rule_id, r.owner, r.bytes_in, r.bytes_out) for r in report.rules] == [("R1", None, 7, 5)]


def test_record_connection_is_still_offloaded(hub, monkeypatch):
    connect(hub)
    assert any(fn == hub.registry.record_connection for fn, _, _ in hub.deferred)
