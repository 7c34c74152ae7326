"""Prometheus text renderer and the server's families (SPEC §8.3, issue 8 point 2, issue 9 point 10)."""

from __future__ import annotations

import io
import json
import subprocess

import pytest

from conftest import require_tool
from portunus.log import log
from portunus.server.metrics import Family, client_labels, render, server_families


def families_in(text: str) -> dict[str, list[str]]:
    """family name -> its sample lines, checking HELP and TYPE come first for each."""
    out: dict[str, list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("# HELP "), lines[i]
        name = lines[i].split()[2]
        assert lines[i + 1].startswith(f"# TYPE {name} "), lines[i + 1]
        i += 2
        rows = []
        while i < len(lines) and not lines[i].startswith("#"):
            rows.append(lines[i])
            i += 1
        out[name] = rows
    return out


# ---------------------------------------------------------------- render


def test_label_values_escape_backslash_quote_and_newline():
    f = Family("x_total", "counter", "h")
    f.add({"client": 'a\\b"c\nd'}, 1)
    assert render([f]).splitlines()[2] == 'x_total{client="a\\\\b\\"c\\nd"} 1'


def test_help_escapes_backslash_and_newline():
    f = Family("x", "gauge", "line one\nback\\slash")
    assert render([f]).splitlines()[0] == "# HELP x line one\\nback\\\\slash"


def test_every_family_has_help_and_type_even_without_samples():
    text = render([Family("a_total", "counter", "A."), Family("b", "gauge", "B.")])
    assert text == "# HELP a_total A.\n# TYPE a_total counter\n# HELP b B.\n# TYPE b gauge\n"


def test_labels_keep_the_order_they_were_given_in():
    f = Family("x", "gauge", "h")
    f.add({"client": "c", "rule": "r", "owner": "o"}, 1)
    f.add({"owner": "o", "client": "c"}, 2)
    rows = render([f]).splitlines()[2:]
    assert rows == ['x{client="c",rule="r",owner="o"} 1', 'x{owner="o",client="c"} 2']


@pytest.mark.parametrize("value,text", [
    (0, "0"), (7, "7"), ((1 << 63) - 1, str((1 << 63) - 1)), (True, "1"), (False, "0"), (2.0, "2"),
    (0.25, "0.25"), (float("nan"), "NaN"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"),
])
def test_sample_values(value, text):
    f = Family("x", "gauge", "h")
    f.add({}, value)
    assert render([f]).splitlines()[2] == f"x {text}"


def test_a_bad_value_skips_only_its_row_and_is_logged(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    f = Family("x_total", "counter", "h")
    f.add({"rule": "good1"}, 1)
    f.add({"rule": "bad"}, "12")
    f.add({"rule": "worse"}, {"nested": 1})
    f.add({"rule": "good2"}, 2)
    assert families_in(render([f]))["x_total"] == ['x_total{rule="good1"} 1', 'x_total{rule="good2"} 2']
    events = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert "metrics.sample_skipped" in events


def test_a_lone_surrogate_in_a_label_still_renders_encodable_text():
    f = Family("x", "gauge", "h")
    f.add({"client": "edge-\ud800"}, 1)
    text = render([f])
    text.encode("utf-8")  # would raise on a lone surrogate
    assert 'x{client="edge-?"} 1' in text


# ---------------------------------------------------------------- the server's families


def client(cid, name, revoked=False):
    return {"client_id": cid, "client_name": name, "revoked_at": "2026-01-01T00:00:00Z" if revoked else None}


def rule(rid, cid, protocol="tcp", targets=1):
    return {"rule_id": rid, "client_id": cid, "protocol": protocol, "owner": None,
            "targets": [{"host": "h", "port": 1}] * targets}


def families(**over):
    args = dict(clients=[client("C1", "edge-01"), client("C2", "edge-02")], connected_ids={"C1"}, rules=[],
                snapshot_of=lambda rid: None, auth_failures={}, rejected_messages={},
                rejected_reasons=("rule_not_owned",), operator_requests={})
    args.update(over)
    return families_in(render(server_families(**args)))


def test_clients_connected_is_one_row_per_enrolled_unrevoked_client():
    fams = families(clients=[client("C1", "edge-01"), client("C2", "edge-02"), client("C3", "gone", revoked=True)])
    assert fams["portunus_clients_connected"] == ['portunus_clients_connected{client="edge-01"} 1',
                                                  'portunus_clients_connected{client="edge-02"} 0']


def test_duplicate_names_keep_the_oldest_bare_and_disambiguate_later_ones_by_id():
    clients = [client("C1", "edge"), client("C2", "edge"), client("C3", "other")]
    assert client_labels(clients) == {"C1": "edge", "C2": "edge (C2)", "C3": "other"}
    rows = families(clients=clients, connected_ids={"C2"})["portunus_clients_connected"]
    assert rows == ['portunus_clients_connected{client="edge"} 0', 'portunus_clients_connected{client="edge (C2)"} 1',
                    'portunus_clients_connected{client="other"} 0']


def test_a_replacement_for_a_revoked_client_gets_the_bare_name():
    clients = [client("OLD", "edge-01", revoked=True), client("NEW", "edge-01")]
    assert client_labels(clients) == {"NEW": "edge-01", "OLD": "edge-01 (OLD)"}
    fams = families(clients=clients, connected_ids={"NEW"}, rules=[rule("R1", "OLD")])
    assert fams["portunus_clients_connected"] == ['portunus_clients_connected{client="edge-01"} 1']
    assert fams["portunus_rule_bytes_in_total"] == [
        'portunus_rule_bytes_in_total{client="edge-01 (OLD)",rule="R1",owner=""} 0']


def test_rejected_messages_always_lists_its_reasons():
    fams = families(rejected_messages={"stats_bad_counter": 3})
    assert fams["portunus_control_rejected_messages_total"] == [
        'portunus_control_rejected_messages_total{reason="rule_not_owned"} 0',
        'portunus_control_rejected_messages_total{reason="stats_bad_counter"} 3']


def test_rule_rows_follow_the_rule_list_and_vanish_when_a_rule_goes():
    snaps = {"R1": {"bytes_in": 5}, "R2": {"bytes_in": 7}}
    both = families(rules=[rule("R1", "C1"), rule("R2", "C2")], snapshot_of=snaps.get)
    assert both["portunus_rule_bytes_in_total"] == [
        'portunus_rule_bytes_in_total{client="edge-01",rule="R1",owner=""} 5',
        'portunus_rule_bytes_in_total{client="edge-02",rule="R2",owner=""} 7']
    one = families(rules=[rule("R2", "C2")], snapshot_of=snaps.get)
    assert one["portunus_rule_bytes_in_total"] == ['portunus_rule_bytes_in_total{client="edge-02",rule="R2",owner=""} 7']
    assert not any("R1" in row for rows in one.values() for row in rows)


def test_protocol_specific_families_only_hold_rules_of_that_protocol():
    fams = families(rules=[rule("T", "C1"), rule("U", "C1", protocol="udp"), rule("M", "C1", targets=2)])
    assert [r.split('rule="')[1][0] for r in fams["portunus_rule_bytes_in_total"]] == ["T", "M"]
    assert [r.split('rule="')[1][0] for r in fams["portunus_rule_udp_datagrams_in_total"]] == ["U"]
    assert len(fams["portunus_rule_dns_failures_total"]) == 3
    assert [r.split('rule="')[1][0] for r in fams["portunus_rule_target_failovers_total"]] == ["M"]


def test_a_rule_without_a_snapshot_reports_zero():
    fams = families(rules=[rule("R1", "C1")])
    assert fams["portunus_rule_bytes_out_total"] == ['portunus_rule_bytes_out_total{client="edge-01",rule="R1",owner=""} 0']


def test_a_poisoned_snapshot_never_breaks_the_render():
    snaps = {"R1": {"bytes_in": "lots", "bytes_out": [1]}, "R2": {"bytes_in": 1}}
    fams = families(rules=[rule("R1", "C1"), rule("R2", "C1")], snapshot_of=snaps.get)
    assert fams["portunus_rule_bytes_in_total"] == ['portunus_rule_bytes_in_total{client="edge-01",rule="R2",owner=""} 1']


def test_server_families_pass_promtool_with_hostile_names():
    promtool = require_tool("promtool")
    clients = [client("C1", 'we"ird\\name\n'), client("C2", 'we"ird\\name\n'), client("C3", "edge-\ud800")]
    text = render(server_families(
        clients=clients, connected_ids={"C1"}, rules=[rule("R1", "C2"), rule("R2", "C3", "udp", 2)],
        snapshot_of=lambda rid: {"bytes_in": 1 << 62}, auth_failures={"invalid_token": 2},
        rejected_messages={"rule_not_owned": 1}, rejected_reasons=("rule_not_owned", "stats_bad_counter"),
        operator_requests={("allow", "ok"): 3, ("deny", "unauthenticated"): 1}))
    res = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
