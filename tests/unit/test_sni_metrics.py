"""SNI and rate-limit counters on the server: what clean_snapshot keeps from a report, and the
SPEC §8.1 families server_families renders from it (issue 12 point 4, issue 13 point 6)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import require_tool
from portunus.control import stats_report as sr
from portunus.control.stats_report import RuleShape, StatsRejected, clean_owner_rows, clean_snapshot
from portunus.relay.sni_listener import PEEK_BUCKETS, PeekHistogram
from portunus.server.metrics import render, server_families

SHAPES = {"r-a": RuleShape(443, 443, 1, "a.example.com", "alice"),
          "r-fb": RuleShape(443, 443, 1, None, "bob"),
          "r-plain": RuleShape(8080, 8080, 1, None, "alice")}


def histogram(*observations) -> dict:
    h = PeekHistogram()
    for seconds in observations:
        h.observe(seconds)
    return h.to_dict()


def listener(**over) -> dict:
    base = {"listen_host": "0.0.0.0", "listen_port": 443, "mode": "sni", "routes_active": 1, "fallback": True,
            "hellos_in_flight": 0, "misses": 2, "parse_failures": 3, "hello_timeouts": 1, "reads_reset": 0,
            "peek_duration_seconds": histogram(0.0005, 0.02, 2.5)}
    base.update(over)
    return base


def sni_snap(rule_id="r-a", pattern="a.example.com", **over) -> dict:
    base = {"rule_id": rule_id, "bytes_in": 1, "sni_pattern": pattern,
            "sni_routes": {"exact": 4, "wildcard": 0, "fallback": 0}, "sni_listener": listener()}
    base.update(over)
    return base


def reason_of(snap) -> str:
    with pytest.raises(StatsRejected) as info:
        clean_snapshot(snap, SHAPES)
    return info.value.reason


def test_the_server_histogram_bounds_are_the_relays():
    assert sr.PEEK_BUCKETS == PEEK_BUCKETS


def test_an_sni_snapshot_keeps_pattern_routes_and_listener():
    out = clean_snapshot(sni_snap(junk=1), SHAPES)
    assert out["sni_pattern"] == "a.example.com"
    assert out["sni_routes"] == {"exact": 4, "wildcard": 0, "fallback": 0}
    assert out["sni_listener"]["misses"] == 2 and out["sni_listener"]["listen_port"] == 443
    assert out["sni_listener"]["peek_duration_seconds"]["count"] == 3
    assert [le for le, _ in out["sni_listener"]["peek_duration_seconds"]["buckets"]] == list(PEEK_BUCKETS)
    assert "junk" not in out


def test_a_plain_rule_without_sni_fields_gets_none():
    out = clean_snapshot({"rule_id": "r-plain", "bytes_in": 5}, SHAPES)
    assert "sni_routes" not in out and "sni_listener" not in out and "rate_limit" not in out


def test_the_fallback_reports_a_null_pattern():
    out = clean_snapshot(sni_snap("r-fb", None, sni_routes={"fallback": 7}), SHAPES)
    assert out["sni_pattern"] is None and out["sni_routes"] == {"exact": 0, "wildcard": 0, "fallback": 7}


@pytest.mark.parametrize("bad", [
    sni_snap(pattern="b.example.com"),                          # not the rule's pattern
    sni_snap(sni_routes={"exact": -1}),
    sni_snap(sni_routes=[1, 2]),
    sni_snap(sni_listener=listener(listen_port=444)),            # another port than the rule's
    sni_snap(sni_listener=listener(listen_port=True)),
    sni_snap(sni_listener=listener(mode="tls")),
    sni_snap(sni_listener=listener(fallback="yes")),
    sni_snap(sni_listener=listener(misses=1 << 63)),
    sni_snap(sni_listener=listener(peek_duration_seconds={"buckets": [], "sum": 0, "count": 0})),
    sni_snap(sni_listener=listener(peek_duration_seconds={
        "buckets": [[le * 2, 0] for le in PEEK_BUCKETS], "sum": 0, "count": 0})),   # other bounds
    sni_snap(sni_listener=listener(peek_duration_seconds={
        "buckets": [[le, 5 - i] for i, le in enumerate(PEEK_BUCKETS)], "sum": 0, "count": 5})),  # not cumulative
    sni_snap(sni_listener=listener(peek_duration_seconds={**histogram(0.1), "count": 0})),  # count < last bucket
    sni_snap(sni_listener=listener(peek_duration_seconds={**histogram(0.1), "sum": float("nan")})),
    sni_snap(sni_listener="x"),
])
def test_malformed_sni_fields_reject_the_snapshot(bad):
    assert reason_of(bad) == sr.MALFORMED


def limiter(**over) -> dict:
    base = {"rejects": {"conn_rate": 3, "owner_concurrent": 1}, "throttle_seconds": {"in": 1.5, "out": 0.0},
            "active": 2, "bandwidth_dropped_in": 0, "bandwidth_dropped_out": 4}
    base.update(over)
    return base


def test_rate_limit_counters_are_kept_with_every_reason():
    out = clean_snapshot({"rule_id": "r-plain", "rate_limit": limiter()}, SHAPES)
    assert out["rate_limit"]["rejects"]["conn_rate"] == 3 and out["rate_limit"]["rejects"]["udp_flow_rate"] == 0
    assert out["rate_limit"]["throttle_seconds"] == {"in": 1.5, "out": 0.0}
    assert out["rate_limit"]["active"] == 2 and out["rate_limit"]["bandwidth_dropped_out"] == 4


@pytest.mark.parametrize("bad", [limiter(rejects={"invented": 1}), limiter(rejects={"conn_rate": -1}),
                                 limiter(throttle_seconds={"in": -1}), limiter(throttle_seconds={"in": "1"}),
                                 limiter(active=True), "x"])
def test_malformed_rate_limit_counters_reject_the_snapshot(bad):
    assert reason_of({"rule_id": "r-plain", "rate_limit": bad}) == sr.MALFORMED


def test_owner_rows_only_for_owners_of_the_clients_rules():
    rows = clean_owner_rows([{"owner": "alice", "active": 3, "throttle_seconds": {"in": 2}}], SHAPES)
    assert rows == [{"owner": "alice", "throttle_seconds": {"in": 2, "out": 0}, "active": 3,
                     "bandwidth_dropped_in": 0, "bandwidth_dropped_out": 0}]
    assert clean_owner_rows(None, SHAPES) == []
    for bad in ([{"owner": "mallory", "active": 1}], [{"owner": "alice"}, {"owner": "alice"}],
                [{"owner": "alice", "active": -1}], "x"):
        with pytest.raises(StatsRejected):
            clean_owner_rows(bad, SHAPES)


# ---------------------------------------------------------------- the families

def rule(rid, cid="C1", owner="alice"):
    return {"rule_id": rid, "client_id": cid, "protocol": "tcp", "owner": owner, "targets": [{"host": "h"}]}


def render_with(snaps: dict, owner_rows=None, rules=None) -> str:
    rules = rules or [rule(rid) for rid in snaps]
    return render(server_families(
        clients=[{"client_id": "C1", "client_name": "edge-01", "revoked_at": None},
                 {"client_id": "C2", "client_name": "edge-02", "revoked_at": None}],
        connected_ids={"C1"}, rules=rules, snapshot_of=snaps.get, auth_failures={}, rejected_messages={},
        operator_requests={}, owner_rows=owner_rows))


def lines(text: str, family: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(family) and not ln.startswith("#")]


def cleaned(*snaps) -> dict:
    return {s["rule_id"]: clean_snapshot(s, SHAPES) for s in snaps}


def test_sni_route_rows_per_rule_and_result():
    text = render_with(cleaned(sni_snap(), sni_snap("r-fb", None, sni_routes={"fallback": 7})))
    rows = lines(text, "portunus_tls_sni_route_total")
    assert 'portunus_tls_sni_route_total{client="edge-01",rule="r-a",owner="alice",result="exact"} 4' in rows
    assert 'portunus_tls_sni_route_total{client="edge-01",rule="r-fb",owner="alice",result="fallback"} 7' in rows
    assert len(rows) == 6


def test_listener_families_are_one_row_per_client_and_port():
    snaps = cleaned(sni_snap(), sni_snap("r-fb", None))  # both rules carry the port's listener
    text = render_with(snaps)
    assert lines(text, "portunus_tls_sni_listener_miss_total") == \
        ['portunus_tls_sni_listener_miss_total{client="edge-01",port="443"} 2']
    assert lines(text, "portunus_tls_sni_listener_parse_failures_total") == \
        ['portunus_tls_sni_listener_parse_failures_total{client="edge-01",port="443"} 3']
    assert lines(text, "portunus_tls_sni_routes_active") == ['portunus_tls_sni_routes_active{client="edge-01"} 1']
    peek = lines(text, "portunus_tls_client_hello_peek_duration_seconds")
    assert 'portunus_tls_client_hello_peek_duration_seconds_bucket{client="edge-01",port="443",le="0.001"} 1' in peek
    assert 'portunus_tls_client_hello_peek_duration_seconds_bucket{client="edge-01",port="443",le="3.0"} 3' in peek
    assert 'portunus_tls_client_hello_peek_duration_seconds_bucket{client="edge-01",port="443",le="+Inf"} 3' in peek
    assert 'portunus_tls_client_hello_peek_duration_seconds_count{client="edge-01",port="443"} 3' in peek
    assert len(peek) == len(PEEK_BUCKETS) + 3


def test_the_same_port_on_two_clients_is_two_rows():
    snaps = cleaned(sni_snap())
    snaps["r-b"] = {**snaps["r-a"], "rule_id": "r-b"}
    text = render_with(snaps, rules=[rule("r-a"), rule("r-b", "C2")])
    assert len(lines(text, "portunus_tls_sni_listener_miss_total")) == 2
    assert len(lines(text, "portunus_tls_sni_routes_active")) == 2


def test_rate_limit_rows_per_rule_and_owner_envelope():
    snaps = cleaned({"rule_id": "r-plain", "rate_limit": limiter()})
    owners = {"C1": clean_owner_rows([{"owner": "alice", "active": 5, "throttle_seconds": {"out": 0.25}}], SHAPES)}
    text = render_with(snaps, owners)
    assert lines(text, "portunus_rate_limit_reject_total") == [
        'portunus_rate_limit_reject_total{client="edge-01",rule="r-plain",owner="alice",reason="conn_rate"} 3',
        'portunus_rate_limit_reject_total{client="edge-01",rule="r-plain",owner="alice",reason="owner_concurrent"} 1']
    throttle = lines(text, "portunus_rate_limit_throttle_seconds_total")
    assert 'portunus_rate_limit_throttle_seconds_total{client="edge-01",rule="r-plain",owner="alice",' \
           'direction="in"} 1.5' in throttle
    assert 'portunus_rate_limit_throttle_seconds_total{client="edge-01",rule="",owner="alice",' \
           'direction="out"} 0.25' in throttle
    assert lines(text, "portunus_rate_limit_active_connections") == [
        'portunus_rate_limit_active_connections{client="edge-01",rule="r-plain",owner="alice"} 2',
        'portunus_rate_limit_active_connections{client="edge-01",rule="",owner="alice"} 5']


def test_families_without_reports_have_help_and_type_but_no_rows():
    text = render_with({"r-plain": {}})
    for family in ("portunus_tls_sni_route_total", "portunus_tls_client_hello_peek_duration_seconds",
                   "portunus_rate_limit_reject_total", "portunus_rate_limit_active_connections"):
        assert f"# TYPE {family} " in text and not lines(text, family + "{")


def test_sni_and_rate_limit_families_pass_promtool():
    promtool = require_tool("promtool")
    snaps = cleaned(sni_snap(), sni_snap("r-fb", None), {"rule_id": "r-plain", "rate_limit": limiter()})
    owners = {"C1": clean_owner_rows([{"owner": "alice", "active": 1}], SHAPES)}
    text = render_with(snaps, owners)
    res = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_stats_text_lines():
    from portunus.cli.caps import stats_lines
    from portunus.control.stats_report import api_stats_extras
    snap = clean_snapshot({**sni_snap(), "rate_limit": limiter()}, SHAPES)
    lines = stats_lines(api_stats_extras(snap))
    assert lines[0] == "  sni a.example.com: routed exact 4, wildcard 0, fallback 0"
    assert lines[1].startswith("  sni listener port 443 (sni, 1 patterns, fallback yes): misses 2, parse failures 3")
    assert lines[2] == ("  rate limit: active 2, rejects conn_rate=3 owner_concurrent=1, throttled in 1.5 s out 0 s, "
                        "udp drops in 0 out 4")
    assert stats_lines({"rule_id": "r"}) == []


def test_owner_rows_of_an_owner_without_live_rules_are_not_rendered():
    owners = {"C1": [{"owner": "bob", "active": 1, "throttle_seconds": {"in": 0, "out": 0},
                      "bandwidth_dropped_in": 0, "bandwidth_dropped_out": 0}]}
    text = render_with({"r-plain": {}}, owners)  # r-plain is alice's
    assert not lines(text, "portunus_rate_limit_active_connections{")
