"""Persisted rules: the port conflict check (SPEC §4.3, §2.1, §2.8), states, the §6 shape."""

from __future__ import annotations

import json
import threading

import pytest

from portunus.errors import PortunusError
from portunus.model import Rule
from portunus.store import clients, rules
from portunus.store.ids import new_ulid

RULE_KEYS = {"rule_id", "client_id", "client_name", "owner", "protocol", "listen_port", "listen_port_end",
             "targets", "prefer_ipv6", "sni_pattern", "rate_limit", "health_check_interval_secs", "state",
             "reason", "created_at"}


@pytest.fixture
def client(store) -> str:
    return clients.create_client(store, "edge-1")["client_id"]


def make(listen, target=None, **fields) -> Rule:
    d = {"rule_id": new_ulid(), "target": target or "10.0.0.9:80", **fields}
    if isinstance(listen, str) and "-" in listen:
        d["listen"] = listen
        if target is None:
            a, b = (int(x) for x in listen.split("-"))
            d["target"] = f"10.0.0.9:{a}-{b}"
    else:
        d["listen_port"] = listen
    return Rule.from_dict(d)


def add(store, client, listen, target=None, **fields) -> dict:
    return rules.insert_rule(store, make(listen, target, **fields), client, None)


def refused(store, client, listen, target=None, **fields) -> PortunusError:
    with pytest.raises(PortunusError) as ei:
        add(store, client, listen, target, **fields)
    return ei.value


# ------------------------------------------------------------------ shape and round trip

def test_insert_stores_pending_in_the_spec_shape(store, client):
    r = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 8443, "protocol": "tcp",
                        "targets": [{"host": "10.0.0.1", "port": 443, "proxy_protocol": "v2"},
                                    {"host": "backup.example", "port": 443, "priority": 5}],
                        "prefer_ipv6": True, "rate_limit": {"bandwidth_in_bps": 1000000},
                        "health_check_interval_secs": 10})
    d = rules.insert_rule(store, r, client, "alice")
    assert RULE_KEYS <= set(d)
    assert d["rule_id"] == r.rule_id and d["client_id"] == client and d["client_name"] == "edge-1"
    assert d["owner"] == "alice"
    assert d["state"] == "pending" and d["reason"] is None
    assert (d["protocol"], d["listen_port"], d["listen_port_end"]) == ("tcp", 8443, 8443)
    assert d["targets"] == [{"host": "10.0.0.1", "port": 443, "priority": 1, "proxy_protocol": "v2"},
                            {"host": "backup.example", "port": 443, "priority": 5, "proxy_protocol": None}]
    assert d["prefer_ipv6"] is True
    assert d["rate_limit"] == {"bandwidth_in_bps": 1000000}
    assert d["health_check_interval_secs"] == 10
    assert d["created_at"].endswith("Z")
    assert json.loads(json.dumps(d)) == d
    assert rules.get_rule(store, r.rule_id) == d


def test_rules_for_client_rebuilds_the_same_rules_oldest_first(store, client):
    a = make(8080, udp_max_flows=64, protocol="udp")
    b = make("30000-30009", listen_host="127.0.0.1")
    c = make(9000, sni_pattern="*.example.com")
    for r in (a, b, c):
        rules.insert_rule(store, r, client, "bob")
    rebuilt = rules.rules_for_client(store, client)
    assert [r.rule_id for r in rebuilt] == [a.rule_id, b.rule_id, c.rule_id]
    from dataclasses import replace
    assert rebuilt == [replace(a, owner="bob"), replace(b, owner="bob"), replace(c, owner="bob")]


def test_stored_ranges_rebuild_even_above_todays_range_limit(store, client):
    wide = Rule.from_dict({"rule_id": new_ulid(), "listen": "20000-21999", "target": "h:20000-21999"},
                          max_range_ports=4096)
    rules.insert_rule(store, wide, client, None)
    assert rules.rules_for_client(store, client)[0].port_count == 2000


def test_owner_defaults_to_the_rules_own(store, client):
    r = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 81, "target": "h:80", "owner": "carol"})
    assert rules.insert_rule(store, r, client, None)["owner"] == "carol"


def test_targets_are_queryable_rows(store, client):
    r = Rule.from_dict({"rule_id": new_ulid(), "listen_port": 81,
                        "targets": ["10.0.0.1:80", "10.0.0.2:81@7"]})
    rules.insert_rule(store, r, client, None)
    rows = store.read().execute("SELECT idx, host, port, priority FROM rule_targets WHERE rule_id = ? "
                                "ORDER BY idx", (r.rule_id,)).fetchall()
    assert [tuple(x) for x in rows] == [(0, "10.0.0.1", 80, 1), (1, "10.0.0.2", 81, 7)]


# ------------------------------------------------------------------ conflicts

def test_same_port_same_protocol_is_port_in_use(store, client):
    first = add(store, client, 8080)
    e = refused(store, client, 8080)
    assert e.code == "port_in_use"
    assert e.message == f"port 8080 already used by rule {first['rule_id']} on this client"
    assert e.fields == {"rule_id": first["rule_id"], "port": 8080}
    assert (e.http_status, e.exit_code) == (409, 5)
    assert len(rules.list_rules(store, client_id=client)) == 1


@pytest.mark.parametrize("listen,port", [
    ("30050-30060", 30050),   # overlaps the top
    ("29990-30000", 30000),   # overlaps the bottom
    ("29900-30100", 30000),   # covers it
    ("30010-30020", 30010),   # inside it
    (30025, 30025),           # a single port inside
])
def test_overlapping_ranges_conflict_naming_the_first_shared_port(store, client, listen, port):
    existing = add(store, client, "30000-30050")
    target = "10.0.0.9:30025" if isinstance(listen, int) else None
    e = refused(store, client, listen, target)
    assert e.code == "port_in_use"
    assert e.fields == {"rule_id": existing["rule_id"], "port": port}


def test_adjacent_ranges_do_not_conflict(store, client):
    add(store, client, "30000-30050")
    add(store, client, "30051-30060")
    add(store, client, "29990-29999")
    add(store, client, 30061)


def test_different_protocols_do_not_conflict(store, client):
    add(store, client, 53, protocol="tcp")
    add(store, client, 53, protocol="udp")
    add(store, client, "6000-6010", protocol="udp")
    assert refused(store, client, 6005, "10.0.0.9:1", protocol="udp").code == "port_in_use"


def test_failed_rules_still_block_their_ports_until_removed(store, client):
    failed = add(store, client, 8080)
    after = rules.set_rule_state(store, failed["rule_id"], "failed", "port_in_use")
    assert (after["state"], after["reason"]) == ("failed", "port_in_use")
    e = refused(store, client, 8080)
    assert e.code == "port_in_use" and e.fields["rule_id"] == failed["rule_id"]
    for state in ("active", "removing"):
        rules.set_rule_state(store, failed["rule_id"], state)
        assert refused(store, client, 8080).code == "port_in_use"
    assert rules.delete_rule(store, failed["rule_id"]) is True
    add(store, client, 8080)


def test_other_clients_may_use_the_same_port(store, client):
    other = clients.create_client(store, "edge-2")["client_id"]
    add(store, client, 8080)
    add(store, other, 8080)


@pytest.mark.parametrize("first,second,clash", [
    ("10.0.0.1", "10.0.0.2", False),
    ("10.0.0.1", "10.0.0.1", True),
    ("0.0.0.0", "10.0.0.1", True),
    ("10.0.0.1", "0.0.0.0", True),
    ("::", "10.0.0.1", True),
    ("10.0.0.1", "::", True),
    ("::", "0.0.0.0", True),
    ("::1", "127.0.0.1", False),
    ("fd00::1", "fd00::2", False),
    ("fd00::1", "fd00:0::1", True),  # the same address, normalized by the model
])
def test_listen_hosts_overlap_only_when_equal_or_wildcard(store, client, first, second, clash):
    add(store, client, 8080, listen_host=first)
    if clash:
        assert refused(store, client, 8080, listen_host=second).code == "port_in_use"
    else:
        add(store, client, 8080, listen_host=second)


def test_a_duplicate_rule_id_is_a_conflict(store, client):
    r = make(8080)
    rules.insert_rule(store, r, client, None)
    with pytest.raises(PortunusError) as ei:
        rules.insert_rule(store, Rule.from_dict({"rule_id": r.rule_id, "listen_port": 9090, "target": "h:1"}),
                          client, None)
    assert ei.value.code == "conflict.rule_exists"


def test_unknown_and_revoked_clients(store, client):
    with pytest.raises(PortunusError) as ei:
        rules.insert_rule(store, make(8080), new_ulid(), None)
    assert ei.value.code == "not_found"
    clients.revoke_client(store, client)
    assert refused(store, client, 8080).code == "conflict.client_revoked"


def active(store, client, listen, target=None, **fields) -> dict:
    """A rule the client acknowledged: it counts for the port's mode (SPEC §2.8)."""
    return rules.set_rule_state(store, add(store, client, listen, target, **fields)["rule_id"], "active")


def test_sni_rules_share_a_port_with_distinct_patterns(store, client):
    a = active(store, client, 443, sni_pattern="a.example.com")
    active(store, client, 443, sni_pattern="*.example.com")
    active(store, client, 443, sni_pattern="example.com")
    e = refused(store, client, 443, sni_pattern="a.example.com")
    assert e.code == "conflict.sni_route_duplicate" and e.fields["rule_id"] == a["rule_id"]
    assert "a.example.com" in e.message and e.fields["port"] == 443
    assert len(rules.list_rules(store, client)) == 3  # nothing stored


def test_sni_rules_on_different_specific_hosts_of_one_wildcard_do_not_share(store, client):
    add(store, client, 443, sni_pattern="a.example.com", listen_host="0.0.0.0")
    e = refused(store, client, 443, sni_pattern="b.example.com", listen_host="10.0.0.1")
    assert e.code == "port_in_use" and "listen host 0.0.0.0" in e.message


def test_a_plain_rule_on_an_sni_port_is_its_one_fallback(store, client):
    active(store, client, 443, sni_pattern="a.example.com")
    fallback = add(store, client, 443, "10.0.0.7:443")
    e = refused(store, client, 443, "10.0.0.8:443")
    assert e.code == "conflict.sni_fallback_duplicate" and e.fields["rule_id"] == fallback["rule_id"]
    assert "fallback" in e.message and "443" in e.message
    # SNI rules may still be added after the fallback
    active(store, client, 443, sni_pattern="b.example.com")
    assert len(rules.list_rules(store, client)) == 3


def test_an_sni_rule_on_a_plain_port_is_refused(store, client):
    plain = active(store, client, 8443)
    e = refused(store, client, 8443, sni_pattern="b.example.com")
    assert e.code == "conflict.legacy_to_sni_unsupported" and e.fields["rule_id"] == plain["rule_id"]
    assert "plain mode" in e.message and "b.example.com" in e.message and e.fields["port"] == 8443


def test_failed_rules_decide_the_mode_pending_ones_do_not(store, client):
    sni = add(store, client, 443, sni_pattern="a.example.com")  # oldest, still pending
    plain = active(store, client, 443)  # joined as the fallback
    # the pending SNI rule does not count: the active plain rule holds the port in plain mode
    e = refused(store, client, 443, sni_pattern="b.example.com")
    assert e.code == "conflict.legacy_to_sni_unsupported" and e.fields["rule_id"] == plain["rule_id"]
    rules.set_rule_state(store, sni["rule_id"], "failed", "port_in_use")
    # a failed rule counts: the oldest counting rule is SNI again
    active(store, client, 443, sni_pattern="b.example.com")
    assert refused(store, client, 443, "10.0.0.8:1").code == "conflict.sni_fallback_duplicate"


def test_when_the_last_sni_rule_goes_the_fallback_holds_the_port_in_plain_mode(store, client):
    sni = active(store, client, 443, sni_pattern="a.example.com")
    active(store, client, 443)
    rules.delete_rule(store, sni["rule_id"])
    assert refused(store, client, 443, sni_pattern="a.example.com").code == "conflict.legacy_to_sni_unsupported"
    assert refused(store, client, 443).code == "port_in_use"


def test_ranges_and_other_hosts_never_join_an_sni_port(store, client):
    active(store, client, 443, sni_pattern="a.example.com")
    assert refused(store, client, "440-450").code == "port_in_use"
    assert refused(store, client, 443, listen_host="10.0.0.1").code == "port_in_use"
    add(store, client, 443, protocol="udp")  # another protocol: another port


def test_concurrent_conflicting_inserts_let_exactly_one_win(store, client):
    outcomes = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        try:
            add(store, client, 7000)
            outcomes.append("ok")
        except PortunusError as e:
            outcomes.append(e.code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["port_in_use"] * 7


# ------------------------------------------------------------------ states, queries, delete

def test_state_transitions_and_reason(store, client):
    r = add(store, client, 8080)
    assert rules.set_rule_state(store, r["rule_id"], "active")["state"] == "active"
    failed = rules.set_rule_state(store, r["rule_id"], "failed", "port_in_use (port 8080 already bound)")
    assert failed["reason"] == "port_in_use (port 8080 already bound)"
    assert rules.set_rule_state(store, r["rule_id"], "pending")["reason"] is None


def test_unknown_state_and_unknown_rule(store, client):
    r = add(store, client, 8080)
    with pytest.raises(PortunusError) as ei:
        rules.set_rule_state(store, r["rule_id"], "exploded")
    assert ei.value.code == "internal"
    for fn in (lambda: rules.set_rule_state(store, "nope", "active"), lambda: rules.get_rule(store, "nope"),
               lambda: rules.get_rule(store, None)):
        with pytest.raises(PortunusError) as ei:
            fn()
        assert ei.value.code == "not_found"
    assert ei.value.http_status == 404


def test_list_rules_filters_by_client_and_owner(store, client):
    other = clients.create_client(store, "edge-2")["client_id"]
    a = rules.insert_rule(store, make(1001), client, "alice")
    b = rules.insert_rule(store, make(1002), client, "bob")
    c = rules.insert_rule(store, make(1003), other, "alice")
    ids = lambda rows: [r["rule_id"] for r in rows]  # noqa: E731
    assert ids(rules.list_rules(store)) == [a["rule_id"], b["rule_id"], c["rule_id"]]
    assert ids(rules.list_rules(store, client_id=client)) == [a["rule_id"], b["rule_id"]]
    assert ids(rules.list_rules(store, owner="alice")) == [a["rule_id"], c["rule_id"]]
    assert ids(rules.list_rules(store, client_id=other, owner="bob")) == []
    assert rules.list_rules(store, client_id=other)[0]["client_name"] == "edge-2"


def test_delete_rule(store, client):
    r = add(store, client, 8080, target=None)
    assert rules.delete_rule(store, r["rule_id"]) is True
    assert rules.delete_rule(store, r["rule_id"]) is False
    assert store.read().execute("SELECT COUNT(*) FROM rule_targets").fetchone()[0] == 0
    assert rules.rules_for_client(store, client) == []


def test_update_rule_spec_changes_the_rate_limit_not_the_listen_side(store, client):
    r = make(8080)
    rules.insert_rule(store, r, client, "alice")
    from dataclasses import replace
    from portunus.model import RateLimit
    updated = rules.update_rule_spec(store, replace(r, rate_limit=RateLimit(bandwidth_out_bps=5000)))
    assert updated["rate_limit"] == {"bandwidth_out_bps": 5000}
    assert updated["owner"] == "alice"
    assert rules.rules_for_client(store, client)[0].rate_limit == RateLimit(bandwidth_out_bps=5000)
    with pytest.raises(PortunusError) as ei:
        rules.update_rule_spec(store, replace(r, listen_port=9090, listen_port_end=9090))
    assert ei.value.code == "validation.listen_immutable"


def test_update_rule_spec_cannot_change_the_sni_pattern(store, client):
    from dataclasses import replace
    r = make(443, sni_pattern="a.example.com")
    rules.insert_rule(store, r, client, None)
    rules.insert_rule(store, make(443, sni_pattern="b.example.com"), client, None)
    with pytest.raises(PortunusError) as ei:
        rules.update_rule_spec(store, replace(r, sni_pattern="b.example.com"))  # would dodge the duplicate check
    assert ei.value.code == "validation.listen_immutable" and "sni_pattern" in ei.value.message
