"""The agent splits stats reports so wide ranges never exceed the 1 MiB frame cap."""

from __future__ import annotations

from types import SimpleNamespace

from portunus.control import agent as agent_mod
from portunus.control.frames import encode
from portunus.relay.enforce import Enforcer
from portunus.relay.stats import RuleCounters


class FrameSink:
    """Stands in for the channel: encodes every message like the real one would."""

    def __init__(self):
        self.frames = []

    def send(self, msg):
        self.frames.append((msg, len(encode(msg))))  # encode raises past 1 MiB
        return True


class Snapshots:
    """What the runtime reports for `rules` rules of `width` ports each, with huge counters."""

    def __init__(self, rules: int, width: int):
        self.ctx = SimpleNamespace(enforcer=Enforcer(None))  # the agent wires quotas and owner caps there
        self.snaps = []
        for i in range(rules):
            c = RuleCounters(range(30000, 30000 + width))
            for pc in c.ports.values():
                pc.bytes_in = pc.bytes_out = 10 ** 15
            snap = {"rule_id": f"r{i}", "protocol": "tcp", "state": "active", "reason": None}
            snap.update(c.snapshot(per_port=True))
            snap["per_target"] = []
            self.snaps.append(snap)

    def snapshots(self, per_port=False, per_target=False):
        return self.snaps


BUNDLE = {"version": 1, "client_id": "c1", "client_name": "edge-01", "server_endpoint": "127.0.0.1:7443",
          "server_cert_sha256": "00" * 32, "token": "not-a-real-token"}


def frames(snapshots) -> list[tuple[dict, int]]:
    """The stats_report messages for ``snapshots`` with their encoded sizes (encode raises past 1 MiB)."""
    return [(msg, len(encode(msg))) for msg in agent_mod.stats_reports(snapshots.snapshots(), now=1.7e9)]


def test_reports_of_several_wide_ranges_are_split_under_the_frame_cap():
    sent = frames(Snapshots(8, 1024))  # one frame would be ~1.3 MiB
    assert len(sent) >= 2
    assert all(size < (1 << 20) for _, size in sent)
    reported = [s["rule_id"] for msg, _ in sent for s in msg["rules"]]
    assert sorted(reported) == [f"r{i}" for i in range(8)]
    assert all(len(s["per_port"]) == 1024 for msg, _ in sent for s in msg["rules"])


def test_a_range_too_wide_for_one_frame_reports_totals_only():
    (msg, size), = frames(Snapshots(1, 8000))
    assert size < (1 << 20)
    snap = msg["rules"][0]
    assert "per_port" not in snap
    assert snap["bytes_in"] == 8000 * 10 ** 15


def test_no_rules_no_report():
    assert agent_mod.stats_reports([], now=1.7e9) == []


def test_the_agent_sends_its_runtimes_counters_as_split_reports():
    sink = FrameSink()
    agent = agent_mod.Agent(None, BUNDLE, Snapshots(8, 1024))
    assert (agent.host, agent.port) == ("127.0.0.1", 7443)
    agent._report(sink)
    assert len(sink.frames) >= 2
    assert sorted(s["rule_id"] for msg, _ in sink.frames for s in msg["rules"]) == [f"r{i}" for i in range(8)]
