"""bench/portbench report, issue 15: the side-by-side figures, the best peer per row, ratios
to direct and to the best peer, the goal marks, and the regression gate (canned summaries)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.report import (ALL_PATHS, DEFAULT_PATHS, NOT_APPLICABLE, PEER_PATHS,  # noqa: E402
                              PORTUNUS_PATHS, best_peer, compare, format_goals,
                              format_ratio_table, format_side_by_side, gate_exit_code,
                              goal_marks, issue_tables, option_mismatch, side_by_side, summarize)

# medians of the issue's table (k scaled back), plus CPU and RTT figures
ISSUE = {
    "direct": {"tcp_bulk_gbps": 23.1, "http_keepalive_rps": 139e3, "http_close_rps": 19.4e3,
               "udp_iperf_1flow_pps": 286e3, "udp_iperf_1flow_loss_pct": 0.0, "http_idle_rtt_p50_us": 40.0},
    "portunus-splice": {"tcp_bulk_gbps": 18.4, "http_keepalive_rps": 54.3e3,
                        "http_close_rps": 7.5e3, "udp_iperf_1flow_pps": 81.3e3,
                        "udp_iperf_1flow_loss_pct": 0.0, "http_idle_rtt_p50_us": 65.0,
                        "http_close_proxy_cpu_us_per_req": 163.0,
                        "http_keepalive_proxy_cpu_us_per_req": 15.0},
    "haproxy": {"tcp_bulk_gbps": 8.5, "http_keepalive_rps": 65.9e3, "http_close_rps": 13.0e3,
                "http_close_proxy_cpu_us_per_req": 95.0,
                "http_keepalive_proxy_cpu_us_per_req": 14.0},
    "haproxy-1t": {"tcp_bulk_gbps": 10.0, "http_keepalive_rps": 60.4e3, "http_close_rps": 13.1e3,
                   "http_close_proxy_cpu_us_per_req": 90.0,
                   "http_keepalive_proxy_cpu_us_per_req": 16.0},
    "nginx": {"tcp_bulk_gbps": 10.9, "http_keepalive_rps": 64.3e3, "http_close_rps": 12.4e3,
              "udp_iperf_1flow_pps": 80.1e3, "udp_iperf_1flow_loss_pct": 0.0},
    "rinetd": {"tcp_bulk_gbps": 8.1, "http_keepalive_rps": 63.0e3, "http_close_rps": 12.6e3},
    "socat": {"tcp_bulk_gbps": 6.3, "http_keepalive_rps": 30.2e3, "http_close_rps": 2.5e3},
}
SHOWN = ["direct", "portunus-splice", "haproxy", "haproxy-1t", "nginx", "rinetd", "socat"]


def _summary(medians: dict) -> dict:
    return summarize({p: {m: [v] for m, v in ms.items()} for p, ms in medians.items()})


def _goal(marks: list[dict], prefix: str, path: str = "portunus-splice") -> dict:
    [row] = [m for m in marks if m["goal"].startswith(prefix) and m["path"] == path]
    return row


def test_path_sets_default_has_every_peer_but_the_splice_reference():
    assert DEFAULT_PATHS == [p for p in ALL_PATHS if p != "haproxy-splice"]
    for p in ("haproxy", "haproxy-1t", "nginx", "rinetd", "socat"):
        assert p in DEFAULT_PATHS and p in PEER_PATHS
    assert not (set(PEER_PATHS) & PORTUNUS_PATHS) and "direct" not in PEER_PATHS
    assert NOT_APPLICABLE["rinetd"] == NOT_APPLICABLE["socat"] == {"udp"}
    assert "nginx" not in NOT_APPLICABLE           # nginx stream carries UDP too


def test_best_peer_is_the_best_non_portunus_non_direct_path_by_direction():
    s = _summary(ISSUE)
    assert best_peer(s, "tcp_bulk_gbps") == ("nginx", 10.9)             # direct/portunus higher
    assert best_peer(s, "http_keepalive_rps") == ("haproxy", 65.9e3)
    assert best_peer(s, "http_close_rps") == ("haproxy-1t", 13.1e3)
    assert best_peer(s, "http_close_proxy_cpu_us_per_req") == ("haproxy-1t", 90.0)  # lower wins
    assert best_peer(s, "udp_iperf_1flow_pps") == ("nginx", 80.1e3)
    assert best_peer(s, "udp_iperf_manyflow_pps") is None


def test_side_by_side_ratios_to_direct_and_to_the_best_peer():
    sbs = side_by_side(_summary(ISSUE), SHOWN)
    ka = sbs["keepalive"]
    assert ka["values"]["portunus-splice"] == 54.3e3 and ka["best_peer"] == ["haproxy", 65.9e3]
    assert ka["x_direct"]["portunus-splice"] == pytest.approx(54.3 / 139)
    assert ka["x_direct"]["socat"] == pytest.approx(30.2 / 139)
    assert ka["x_best_peer"] == {"portunus-splice": pytest.approx(54.3 / 65.9)}   # portunus only
    assert "direct" not in ka["x_direct"]
    assert sbs["bulk"]["x_best_peer"]["portunus-splice"] == pytest.approx(18.4 / 10.9)
    assert sbs["rttadd"]["values"] == {"portunus-splice": 25.0}      # derived: 65 - 40
    assert sbs["rttadd"]["x_direct"] == {}                           # no ratio of a difference


def test_side_by_side_table_cells_na_error_loss_and_best_peer_column():
    med = {k: dict(v) for k, v in ISSUE.items()}
    med["portunus-splice"]["udp_iperf_1flow_loss_pct"] = 0.4
    s = _summary(med)
    sbs = side_by_side(s, SHOWN + ["client-splice"])
    lines = format_side_by_side(sbs, SHOWN + ["client-splice"], NOT_APPLICABLE,
                                {"client-splice": ["start failed"]}, 256)
    assert lines[0] == ("| figure | direct | portunus-splice | haproxy | haproxy-1t | nginx | "
                        "rinetd | socat | client-splice | best peer |")
    assert lines[1] == "| --- |" + " ---: |" * 9
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines[2:]}
    assert rows["TCP bulk, Gbit/s"] == ("| TCP bulk, Gbit/s | 23.1 | 18.4 | 8.5 | 10.0 | 10.9 | "
                                        "8.1 | 6.3 | error | nginx 10.9 |")
    assert rows["UDP 64 B, 1 flow (iperf3), k datagrams/s"] == (
        "| UDP 64 B, 1 flow (iperf3), k datagrams/s | 286.0 | 81.3 (0.40% loss) | n/a | n/a | 80.1 | "
        "n/a | n/a | error | nginx 80.1 |")
    assert rows["new connections, k/s"].startswith("| new connections, k/s | 19.40 | 7.50 |")
    assert rows["CPU per new connection, µs"] == (
        "| CPU per new connection, µs | – | 163 | 95 | 90 | – | – | – | error | haproxy-1t 90 |")
    assert "UDP 64 B, 256 flows (iperf3), k datagrams/s" not in rows          # nobody measured it


def test_ratio_table_columns_per_path_and_best_peer_for_portunus():
    sbs = side_by_side(_summary(ISSUE), SHOWN)
    lines = format_ratio_table(sbs, SHOWN, 256)
    head = lines[0].strip("| ").split(" | ")
    assert head[0] == "figure" and head[1] == "portunus-splice ×direct"
    assert head[-1] == "portunus-splice ×best peer" and "direct ×direct" not in head
    bulk = [ln for ln in lines if ln.startswith("| TCP bulk")][0].strip("| ").split(" | ")
    assert bulk[1] == "0.80" and bulk[-1] == "1.69"


def test_goal_marks_on_the_issue_figures():
    marks = goal_marks(_summary(ISSUE), SHOWN)
    assert {m["path"] for m in marks} == {"portunus-splice"}        # portunus paths only
    ka = _goal(marks, "keep-alive req/s")
    assert ka["met"] is False and ka["reference"] == "haproxy"
    assert ka["ratio"] == pytest.approx(54.3 / 65.9)
    conn = _goal(marks, "new connections/s")
    assert conn["reference"] == "haproxy-1t" and conn["met"] is False
    cpu = _goal(marks, "CPU per new connection")
    assert cpu["reference"] == "haproxy-1t" and cpu["reference_value"] == 90.0  # better haproxy
    assert cpu["ratio"] == pytest.approx(163 / 90) and cpu["met"] is False
    cpu_ka = _goal(marks, "CPU per keep-alive")
    assert cpu_ka["reference"] == "haproxy" and cpu_ka["met"] is False          # 15 > 14
    assert _goal(marks, "UDP 1 flow")["met"] is False                # 1.01x, wants 2x
    assert _goal(marks, "UDP N flows")["met"] is None                # no figure
    assert _goal(marks, "TCP bulk")["met"] is True                   # 1.69x >= 1.3x
    rtt = _goal(marks, "added idle RTT")
    assert rtt["value"] == 25.0 and rtt["met"] is True


def test_goal_met_rate_is_missed_when_it_was_lossy():
    med = {k: dict(v) for k, v in ISSUE.items()}
    med["portunus-splice"].update(udp_iperf_1flow_pps=200e3, udp_iperf_1flow_loss_pct=0.0)
    assert _goal(goal_marks(_summary(med), SHOWN), "UDP 1 flow")["met"] is True
    med["portunus-splice"]["udp_iperf_1flow_loss_pct"] = 0.1
    row = _goal(goal_marks(_summary(med), SHOWN), "UDP 1 flow")
    assert row["met"] is False and row["loss_pct"] == 0.1
    assert format_goals([row], 256) == [
        "  MISSED portunus-splice     UDP 1 flow (iperf3) ≥ 2× nginx, 0 % loss        "
        "2.50× nginx, 0.10% loss"]


def test_goal_lines_verdicts_and_the_flow_count():
    lines = format_goals(goal_marks(_summary(ISSUE), SHOWN), 256)
    assert len(lines) == 8
    assert lines[0].split()[:2] == ["MISSED", "portunus-splice"]
    assert any(" MET " in f" {ln} " and "TCP bulk" in ln and ln.endswith("1.69× nginx")
               for ln in lines)
    assert any(ln.strip().startswith("?") and "256 flows" in ln and ln.endswith("no figure")
               for ln in lines)
    assert any("added idle RTT" in ln and ln.endswith(" 25") for ln in lines)


def test_issue_tables_text_has_the_three_sections():
    sbs, goals, text = issue_tables(_summary(ISSUE), SHOWN, {}, 256)
    assert text.startswith("side by side (medians; best peer")
    assert "\nratios (value / reference" in text and "\ngoals of issue 15" in text
    assert sbs["bulk"]["best_peer"] == ["nginx", 10.9] and len(goals) == 8


def test_gate_exits_1_on_a_regression_beyond_25_percent_of_any_compared_median():
    base = {"summary": _summary({"haproxy": {"http_close_rps": 13e3},
                                 "portunus-splice": {"http_close_proxy_cpu_us_per_req": 100.0,
                                                     "proxy_startup_s": 0.1}})}
    ok, _ = compare(_summary({"haproxy": {"http_close_rps": 10e3},
                              "portunus-splice": {"http_close_proxy_cpu_us_per_req": 124.0,
                                                  "proxy_startup_s": 9.0}}), base, 25.0)
    assert gate_exit_code(ok) == 0 and {r["metric"] for r in ok} == {
        "http_close_rps", "http_close_proxy_cpu_us_per_req"}           # startup never compared
    bad, _ = compare(_summary({"haproxy": {"http_close_rps": 13e3},
                               "portunus-splice": {"http_close_proxy_cpu_us_per_req": 126.0}}),
                     base, 25.0)
    assert gate_exit_code(bad) == 1
    assert [r["metric"] for r in bad if r["regressed"]] == ["http_close_proxy_cpu_us_per_req"]
    assert gate_exit_code([]) == 0


def test_option_mismatch_names_what_makes_a_baseline_incomparable():
    base = {"quick": False, "repeat": 3, "wrk_conns": 50, "origin": "nginx", "paths": ["direct"]}
    assert option_mismatch(base, dict(base, paths=["socat"])) == []    # paths: compare handles
    assert option_mismatch(base, dict(base, wrk_conns=32, origin="python")) == [
        "wrk_conns: 50 -> 32", "origin: 'nginx' -> 'python'"]
    assert option_mismatch({}, {"quick": True}) == []                   # old baseline: unknown
