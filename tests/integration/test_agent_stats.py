"""The agent splits stats reports so wide ranges never exceed the 1 MiB frame cap."""

from __future__ import annotations

from portunus.control import agent as agent_mod
from portunus.control.frames import encode
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


def _agent(runtime):
    a = agent_mod.Agent.__new__(agent_mod.Agent)
    a.runtime = runtime
    return a


def test_reports_of_several_wide_ranges_are_split_under_the_frame_cap():
    sink = FrameSink()
    _agent(Snapshots(8, 1024))._report(sink)  # one frame would be ~1.3 MiB
    assert len(sink.frames) >= 2
    assert all(size < (1 << 20) for _, size in sink.frames)
    reported = [s["rule_id"] for msg, _ in sink.frames for s in msg["rules"]]
    assert sorted(reported) == [f"r{i}" for i in range(8)]
    assert all(len(s["per_port"]) == 1024 for msg, _ in sink.frames for s in msg["rules"])


def test_a_range_too_wide_for_one_frame_reports_totals_only():
    sink = FrameSink()
    _agent(Snapshots(1, 8000))._report(sink)
    (msg, size), = sink.frames
    assert size < (1 << 20)
    snap = msg["rules"][0]
    assert "per_port" not in snap
    assert snap["bytes_in"] == 8000 * 10 ** 15
