"""Concepts written once (issue 9 point 6): where a second copy must exist (the relay may not import
control/), these tests keep it equal to the one table."""

from __future__ import annotations

import pytest

from portunus.control import messages as m
from portunus.control.agent import SUPPORTED_CAPABILITIES
from portunus.control.stats_report import PORT_COUNTERS, RULE_COUNTERS
from portunus.errors import PortunusError
from portunus.model import Rule
from portunus.relay.stats import PortCounters, RuleCounters
from portunus.server.core import API_RULE_COUNTERS, required_capabilities
from portunus.store import clients as store_clients
from portunus.store.db import parse_rfc3339, rfc3339


def test_the_relay_reports_every_counter_the_server_accepts():
    snap = RuleCounters([18000]).snapshot(per_port=True)
    assert [k for k in RULE_COUNTERS if k not in snap] == []
    assert [k for k in PORT_COUNTERS if k not in PortCounters(18000).to_dict()] == []


def test_the_api_shows_only_reported_counters():
    assert set(API_RULE_COUNTERS) <= set(RULE_COUNTERS)


def test_the_agent_declares_the_one_capability_list():
    assert SUPPORTED_CAPABILITIES == list(m.CAPABILITIES)


def test_every_capability_a_rule_can_need_is_one_the_client_may_declare():
    rules = [Rule.from_dict({"rule_id": "R1", "protocol": "udp", "listen_port": 18000,
                             "targets": ["127.0.0.1:9000@1", "127.0.0.2:9000@2"]}),
             Rule.from_dict({"rule_id": "R2", "listen_port": 18000, "listen_port_end": 18001,
                             "target": "127.0.0.1:9000-9001"})]
    needed = {cap for rule in rules for cap, _code in required_capabilities(rule)}
    assert {"udp", "multi_target", "port_range"} <= needed <= set(m.CAPABILITIES)


@pytest.mark.parametrize("when", [0, 1700000000, 1700000000.9])
def test_the_one_rfc3339_formatter_takes_unix_seconds_and_round_trips(when):
    text = rfc3339(when)
    assert len(text) == 20 and text.endswith("Z")
    assert parse_rfc3339(text).timestamp() == int(when)
    assert rfc3339(parse_rfc3339(text)) == text


@pytest.mark.parametrize("name", ["", "   ", "x" * 129, "two\nlines", 7, None])
def test_one_client_name_rule(name):
    with pytest.raises(PortunusError) as exc:
        store_clients.check_client_name(name)
    assert exc.value.code == "validation.invalid_client_name"


@pytest.mark.parametrize("ttl", [0, 86401, True, "600", 1.5])
def test_one_enrollment_ttl_rule(ttl):
    with pytest.raises(PortunusError) as exc:
        store_clients.check_enrollment_ttl(ttl)
    assert exc.value.code == "validation.invalid_ttl" and "86400" in exc.value.message
