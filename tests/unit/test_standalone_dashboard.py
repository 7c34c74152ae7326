"""The sans-IO stats dashboard (SPEC §7.4): snapshots + injected clock -> rates; state + size -> lines."""

from __future__ import annotations

import pytest

from portunus.standalone.dashboard import ALERT, DIM, SELECTED, Dashboard, human_bytes, render, to_ascii


def rule(rid="web", protocol="tcp", bytes_in=0, bytes_out=0, conns=0, flows=0, listen="8080",
         listen_host="0.0.0.0", targets=("10.0.0.5:80",), per_port=None, per_target=None, state="active", **extra):
    row = {"rule_id": rid, "protocol": protocol, "state": state, "reason": None, "bytes_in": bytes_in,
           "bytes_out": bytes_out, "active_connections": conns, "active_flows": flows, "connections_total": conns,
           "listen": listen, "listen_host": listen_host, "targets": list(targets),
           "per_port": per_port if per_port is not None else
           [{"listen_port": int(listen.split("-")[0]), "bytes_in": bytes_in, "bytes_out": bytes_out,
             "active_connections": conns, "datagrams_in": 0, "datagrams_out": 0}],
           "per_target": per_target if per_target is not None else
           [{"index": i, "host": t.rsplit(":", 1)[0], "port": int(t.rsplit(":", 1)[1].split("-")[0]),
             "priority": i + 1, "health": "healthy", "consecutive_failures": 0, "bytes_in": bytes_in,
             "bytes_out": bytes_out, "connections": conns} for i, t in enumerate(targets)]}
    row.update(extra)
    return row


def snap(*rules, pid=100, label="lab"):
    return {"label": label, "pid": pid, "rules": list(rules)}


def text(lines) -> str:
    return "\n".join(t for t, _ in lines)


def row_of(lines, rid: str) -> str:
    [line] = [t for t, _ in lines if t[1:].startswith(rid + " ")]
    return line


@pytest.fixture
def dash():
    return Dashboard(socket_path="/run/p.sock", refresh_ms=1000)


def test_first_snapshot_shows_counters_but_no_rate_yet(dash):
    dash.update(snap(rule(bytes_in=2048, bytes_out=1024, conns=2)), now=10.0)
    line = row_of(render(dash, 160, 40), "web")
    cells = line[1:].split()
    assert cells[:6] == ["web", "tcp", "*:8080", "10.0.0.5:80", "active", "2"]
    assert "2.0 KiB" in line and "1.0 KiB" in line
    assert line.rstrip().endswith("-            -")


def test_live_rate_is_the_byte_delta_over_the_injected_time_delta(dash):
    dash.update(snap(rule(bytes_in=0, bytes_out=0)), now=10.0)
    dash.update(snap(rule(bytes_in=4 * 1024 * 1024, bytes_out=1024 * 1024)), now=12.0)
    assert dash.rate("rule", "web", None) == (2 * 1024 * 1024, 512 * 1024)
    line = row_of(render(dash, 160, 40), "web")
    assert "2.0 MiB/s" in line and "512.0 KiB/s" in line


def test_counters_that_go_backwards_or_a_new_pid_give_no_rate(dash):
    dash.update(snap(rule(bytes_in=5000)), now=1.0)
    dash.update(snap(rule(bytes_in=100)), now=2.0)  # counters reset without a pid change
    assert dash.rate("rule", "web", None) == (None, None)
    dash.update(snap(rule(bytes_in=200), pid=101), now=3.0)  # restarted process: old baseline is void
    assert dash.rate("rule", "web", None) == (None, None)
    dash.update(snap(rule(bytes_in=1200), pid=101), now=4.0)
    assert dash.rate("rule", "web", None) == (1000.0, 0.0)


def test_totals_sum_rules_bytes_live_counts_and_rates(dash):
    dash.update(snap(rule("a", conns=1), rule("u", protocol="udp", flows=3, listen="53")), now=0.0)
    dash.update(snap(rule("a", bytes_in=1024, bytes_out=2048, conns=1),
                     rule("u", protocol="udp", bytes_in=1024, flows=3, listen="53")), now=1.0)
    lines = render(dash, 160, 40)
    assert row_of(lines, "u").split()[5] == "3"  # UDP rules show their flows
    total = row_of(lines, "TOTAL")
    assert total.split()[1:4] == ["2", "rules", "4"]
    assert "2.0 KiB/s" in total and "2.0 KiB" in total


def test_listen_host_and_several_targets_are_shown_compactly(dash):
    dash.update(snap(rule(listen_host="::1", listen="30000-30009", targets=("a:1", "b:2", "c:3"))), now=0)
    line = row_of(render(dash, 160, 40), "web")
    assert "[::1]:30000-30009" in line and "a:1 +2" in line


@pytest.mark.parametrize("width,height", [(160, 40), (80, 24), (40, 10), (20, 5), (1, 1), (200, 3)])
def test_every_size_gives_exactly_height_lines_none_wider_than_the_screen(dash, width, height):
    dash.update(snap(*[rule(f"rule-{i}-with-a-long-name", bytes_in=i * 10**9) for i in range(30)]), now=0)
    dash.detail = True
    lines = render(dash, width, height)
    assert len(lines) == height
    assert all(len(t) <= width for t, _ in lines)
    assert "q quit"[:width] in lines[-1][0] or width < 6


def test_keys_move_the_selection_within_bounds_and_toggle_detail(dash):
    dash.update(snap(rule("a"), rule("b"), rule("c")), now=0)
    assert dash.press("k") and dash.selected == 0
    dash.press("j")
    dash.press("down")
    dash.press("down")
    assert dash.selected == 2
    dash.press("up")
    assert dash.selected == 1
    lines = render(dash, 160, 40)
    assert [t for t, s in lines if s == SELECTED] == [row_of(lines, "b")]
    assert row_of(lines, "b").startswith(">")
    assert "rule 'b'" not in text(lines)
    dash.press("enter")
    assert "rule 'b': tcp *:8080 -> 10.0.0.5:80  state active" in text(render(dash, 160, 40))
    dash.press("enter")
    assert "rule 'b'" not in text(render(dash, 160, 40))
    assert dash.press("q") is False


def test_detail_shows_per_port_and_per_target_rows_with_rates(dash):
    ports = lambda k: [{"listen_port": p, "bytes_in": k * (p - 29999) * 1024, "bytes_out": 0,  # noqa: E731
                        "active_connections": 1, "datagrams_in": 0, "datagrams_out": 0} for p in (30000, 30001)]
    targets = lambda k: [{"index": 0, "host": "10.0.0.5", "port": 30000, "priority": 1, "health": "healthy",  # noqa
                          "consecutive_failures": 0, "bytes_in": k * 3072, "bytes_out": 0, "connections": 2},
                         {"index": 1, "host": "10.0.0.6", "port": 30000, "priority": 2, "health": "failed",
                          "consecutive_failures": 3, "bytes_in": 0, "bytes_out": 0, "connections": 0}]
    for k, now in ((0, 0.0), (1, 1.0)):
        dash.update(snap(rule(listen="30000-30001", targets=("10.0.0.5:30000-30001", "10.0.0.6:30000-30001"),
                              per_port=ports(k), per_target=targets(k))), now=now)
    dash.press("enter")
    out = text(render(dash, 160, 40)).splitlines()
    port_rows = [line for line in out if line.strip().startswith(("30000 ", "30001 "))]
    assert [r.split()[0] for r in port_rows] == ["30000", "30001"]
    assert "1.0 KiB/s" in port_rows[0] and "2.0 KiB/s" in port_rows[1]
    primary = [line for line in out if line.startswith("10.0.0.5:30000-30001")]
    backup = [line for line in out if line.startswith("10.0.0.6:30000-30001")]
    assert primary and "healthy" in primary[0] and "3.0 KiB/s" in primary[0]
    assert backup and backup[0].split()[1:4] == ["2", "failed", "3"]


def test_a_wide_range_shows_the_busiest_ports_and_says_how_many_are_hidden(dash):
    def ports(busy_bytes):
        return [{"listen_port": p, "bytes_in": busy_bytes if p in (31000, 31500) else 0, "bytes_out": 0,
                 "active_connections": 0, "datagrams_in": 0, "datagrams_out": 0} for p in range(31000, 32000)]
    dash.update(snap(rule(listen="31000-31999", per_port=ports(0))), now=0)
    dash.update(snap(rule(listen="31000-31999", per_port=ports(10_000))), now=1)
    dash.press("enter")
    out = text(render(dash, 160, 60))
    assert "984 more ports (the busiest are shown)" in out
    assert "31500 " in out and "31000 " in out


def test_losing_the_socket_keeps_the_last_data_marked_stale_then_recovers(dash):
    dash.update(snap(rule(bytes_in=1024)), now=5.0)
    dash.lost("cannot read stats socket /run/p.sock: No such file or directory", now=6.0)
    dash.lost("cannot read stats socket /run/p.sock: Connection refused", now=8.0)
    lines = render(dash, 160, 40)
    [alert] = [t for t, s in lines if s == ALERT]
    assert alert.startswith("reconnecting… (showing data from 3 s ago): cannot read stats socket /run/p.sock: "
                            "Connection refused")
    assert row_of(lines, "web").split()[6:8] == ["1.0", "KiB"]
    assert all(s in (SELECTED, DIM) for t, s in lines if t.startswith((">", " web")))
    dash.update(snap(rule(bytes_in=10), pid=200), now=9.0)
    lines = render(dash, 160, 40)
    assert not [t for t, s in lines if s == ALERT]
    assert "connected" in lines[0][0]


def test_before_any_snapshot_it_says_it_is_waiting_or_reconnecting(dash):
    assert "waiting for the first snapshot" in text(render(dash, 80, 10))
    dash.lost("cannot read stats socket /run/p.sock: No such file or directory", now=1.0)
    assert "reconnecting…: cannot read stats socket" in text(render(dash, 80, 10))


def test_the_selection_follows_its_rule_across_a_reload(dash):
    dash.update(snap(rule("a"), rule("b"), rule("c")), now=0)
    dash.press("j")
    dash.update(snap(rule("new"), rule("a"), rule("b"), rule("c")), now=1)
    assert dash.rules[dash.selected]["rule_id"] == "b"
    dash.update(snap(rule("a")), now=2)  # b is gone: stay in bounds
    assert dash.selected == 0


def test_selection_stays_visible_when_rules_do_not_fit(dash):
    dash.update(snap(*[rule(f"r{i:02}") for i in range(50)]), now=0)
    for _ in range(45):
        dash.press("j")
    lines = render(dash, 160, 12)
    assert row_of(lines, "r45").startswith(">")
    dash.press("home")
    assert row_of(render(dash, 160, 12), "r00").startswith(">")


def test_a_malformed_snapshot_renders_instead_of_crashing(dash):
    dash.update({"rules": [{"rule_id": 5, "bytes_in": "lots", "per_port": "x", "per_target": [1, None],
                            "targets": "nope", "active_connections": -3}, "junk", None]}, now=0)
    dash.update({"rules": "not a list", "pid": [1]}, now=1)
    dash.press("enter")
    assert len(render(dash, 100, 20)) == 20


def test_units_and_ascii_fallback():
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 1024**3)] == ["0 B", "1023 B", "1.0 KiB", "5.0 GiB"]
    assert to_ascii("reconnecting… a → b") == "reconnecting... a -> b"


def test_sni_rules_show_their_pattern_the_fallback_and_the_routing_counters(dash):
    listener = {"mode": "sni", "routes_active": 2, "misses": 4, "parse_failures": 3, "hello_timeouts": 1,
                "reads_reset": 0}
    dash.update(snap(rule("site-a", listen="443", sni_pattern="a.example.com", listener=None,
                          sni_routes={"exact": 7, "wildcard": 0, "fallback": 0}, sni_listener=listener),
                     rule("catch-all", listen="443", sni_pattern=None,
                          sni_routes={"exact": 0, "wildcard": 0, "fallback": 2}, sni_listener=listener),
                     rule("plain", listen="8080")), now=0)
    lines = render(dash, 200, 40)
    assert "*:443" in row_of(lines, "site-a") and "sni a.example.com -> 10.0.0.5:80" in row_of(lines, "site-a")
    assert "sni fallback -> 10.0.0.5:80" in row_of(lines, "catch-all")
    assert "sni" not in row_of(lines, "plain")
    dash.press("enter")
    detail = text(render(dash, 200, 40))
    assert "rule 'site-a': tcp *:443 sni a.example.com -> 10.0.0.5:80  state active" in detail
    assert "sni routed exact 7 wildcard 0 fallback 0" in detail
    assert "misses 4 parse failures 3 hello timeouts 1" in detail
