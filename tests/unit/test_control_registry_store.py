"""StoreClientRegistry.set_rule_state_unless_stored on a real SQLite store: a read when the state is
already stored (the acked push's waiter wrote it), a write when the waiter gave up (rule still pending)."""

from __future__ import annotations

import pytest

from portunus.errors import PortunusError
from portunus.model import Rule
from portunus.server.client_registry import StoreClientRegistry
from portunus.store import clients, rules


def _rule(store) -> tuple[str, str]:
    cid = clients.create_client(store, "edge-1")["client_id"]
    rule = Rule.from_dict({"rule_id": "01J00000000000000000000001", "listen_port": 8080, "target": "127.0.0.1:80"})
    rules.insert_rule(store, rule, cid, None)
    return cid, rule.rule_id


def test_the_waiters_failure_wording_is_kept_and_a_pending_rule_gets_the_late_ack(store):
    reg = StoreClientRegistry(store)
    _cid, rid = _rule(store)
    assert rules.get_rule(store, rid)["state"] == "pending"
    reg.set_rule_state_unless_stored(rid, "active", None)  # the waiter timed out (202): the hub stores it
    assert rules.get_rule(store, rid)["state"] == "active"
    rules.set_rule_state(store, rid, "failed", "activation failed")  # the waiter's own words
    before = rules.get_rule(store, rid)
    reg.set_rule_state_unless_stored(rid, "failed", None)  # already stored: untouched
    assert rules.get_rule(store, rid) == before


def test_a_rule_removed_meanwhile_raises_like_set_rule_state(store):
    reg = StoreClientRegistry(store)
    with pytest.raises(PortunusError):
        reg.set_rule_state_unless_stored("01J0000000000000000000000X", "active", None)
    with pytest.raises(PortunusError):
        reg.set_rule_state("01J0000000000000000000000X", "active", None)
