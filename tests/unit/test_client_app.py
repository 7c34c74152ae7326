"""The client wiring's pure parts: settings from the command line and the environment, the log flush timer."""

from __future__ import annotations

from portunus.cli.client import _run_parser
from portunus.client import app
from portunus.log import log


def test_settings_defaults_are_the_command_line_defaults():
    args = _run_parser().parse_args([])
    defaults = app.AgentSettings()
    assert (args.reconnect_initial_delay_ms, args.reconnect_max_delay_secs, args.shutdown_drain_timeout_secs,
            args.stats_report_interval_secs) == (
        defaults.reconnect_initial_delay_ms, defaults.reconnect_max_delay_secs,
        defaults.shutdown_drain_timeout_secs, defaults.stats_report_interval_secs)


def test_dns_servers_and_capabilities_from_the_environment():
    # blank entries are dropped; the resolver's parse_servers validates the rest
    assert app.dns_servers_from_env({"PORTUNUS_DNS_SERVERS": "10.0.0.53, ,10.0.0.54:5353"}) == [
        "10.0.0.53", "10.0.0.54:5353"]
    assert app.dns_servers_from_env({}) == []
    assert app.capabilities_from_env({}) is None
    assert app.capabilities_from_env({"PORTUNUS_CLIENT_CAPABILITIES": ""}) == []
    assert app.capabilities_from_env({"PORTUNUS_CLIENT_CAPABILITIES": "udp,,sni"}) == ["udp", "sni"]


class FakeLoop:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, callback, *args):
        self.timers.append((delay, callback, args))


def test_rate_limited_summaries_are_flushed_on_a_timer_that_rearms(monkeypatch):
    flushed = []
    monkeypatch.setattr(log, "flush_limited", lambda: flushed.append(True))
    loop = FakeLoop()
    app.flush_limited_every(loop, 60.0)
    assert [d for d, _, _ in loop.timers] == [60.0] and flushed == []
    _, callback, args = loop.timers.pop()
    callback(*args)
    assert flushed == [True] and [d for d, _, _ in loop.timers] == [60.0]
