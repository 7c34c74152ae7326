"""The agent splits stats reports so wide ranges never exceed the 1 MiB frame cap."""

from __future__ import annotations

from portunus.control import agent as agent_mod
from portunus.control.frames import encode
from portunus.loop import Loop
from portunus.model import Rule
from portunus.relay.runtime import RuleRuntime

from conftest import free_port_block


class FrameSink:
    """Stands in for the channel: encodes every message like the real one would."""

    def __init__(self):
        self.frames = []

    def send(self, msg):
        self.frames.append((msg, len(encode(msg))))  # encode raises past 1 MiB
        return True


def test_reports_of_several_wide_ranges_are_split_under_the_frame_cap():
    loop = Loop()
    try:
        rt = RuleRuntime(loop)
        for i in range(8):
            base = free_port_block(1024)
            rt.activate(Rule.from_dict({"rule_id": f"r{i}", "listen": f"{base}-{base + 1023}",
                                        "target": f"127.0.0.1:{40000 - 1024}-{40000 - 1}"}))
        for live in rt.rules.values():  # large counters make the JSON as wide as it gets
            for pc in live.counters.ports.values():
                pc.bytes_in = pc.bytes_out = 10 ** 15
        a = agent_mod.Agent.__new__(agent_mod.Agent)
        a.runtime = rt
        sink = FrameSink()
        a._report(sink)
        assert len(sink.frames) >= 2
        assert all(size < (1 << 20) for _, size in sink.frames)
        reported = [s["rule_id"] for msg, _ in sink.frames for s in msg["rules"]]
        assert sorted(reported) == [f"r{i}" for i in range(8)]
        assert all(len(s["per_port"]) == 1024 for msg, _ in sink.frames for s in msg["rules"])
    finally:
        for rid in list(rt.rules):
            rt.remove(rid)
        loop.close()
