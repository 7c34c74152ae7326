"""bench/portbench report: summary, table, ratios, baseline comparison, on canned samples."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.report import (NOT_APPLICABLE, compare, fmt, format_compare,  # noqa: E402
                              format_header, format_issues, format_ratios, format_table, ratios,
                              summarize)


def _baseline(**metrics: float) -> dict:
    """A baseline document with path/metric medians, e.g. direct__udp_1flow_pps=100."""
    summary: dict = {}
    for key, median in metrics.items():
        path, metric = key.split("__")
        summary.setdefault(path.replace("_", "-"), {})[metric] = {"median": median,
                                                                  "compared": True}
    return {"summary": summary}


def _current(**metrics: float) -> dict:
    return _baseline(**metrics)["summary"]


def test_summarize_median_min_max_and_metric_attributes():
    s = summarize({"direct": {"tcp_bulk_gbps": [30.0, 10.0, 20.0]}})
    cell = s["direct"]["tcp_bulk_gbps"]
    assert (cell["median"], cell["min"], cell["max"]) == (20.0, 10.0, 30.0)
    assert cell["samples"] == [30.0, 10.0, 20.0]
    assert (cell["unit"], cell["better"], cell["compared"]) == ("Gbit/s", "higher", True)
    assert summarize({"p": {"proxy_startup_s": [0.2]}})["p"]["proxy_startup_s"]["compared"] is False


@pytest.mark.parametrize("value, unit, text", [
    (None, "ms", "-"), (12.345, "Gbit/s", "12.35"), (123456.7, "req/s", "123,457"),
    (0.12345, "ms", "0.123"), (41.6, "us", "42"), (0.04, "%", "0.0"), (23.204, "MiB", "23.20"),
])
def test_fmt_per_unit(value, unit, text):
    assert fmt(value, unit) == text


def test_table_rows_cells_spread_and_missing_markers():
    summary = summarize({
        "direct": {"udp_1flow_pps": [100_000.0, 90_000.0, 110_000.0]},
        "portunus-userspace": {"udp_1flow_pps": [50_000.0]},
    })
    paths = ["direct", "portunus-userspace", "haproxy", "client-splice", "client-userspace"]
    text = format_table(summary, paths, NOT_APPLICABLE, {"client-splice": ["start failed"]})
    head, rule, row = text.splitlines()
    assert head.startswith("metric") and head.split()[2:] == paths
    assert rule == "-" * len(head)
    assert row.startswith("UDP echo, round trip, 1 flow") and row.split()[6:] == [
        "pkt/s", "100,000", "±10%", "50,000", "n/a", "error", "-"]


def test_table_leaves_out_metrics_no_shown_path_has():
    summary = summarize({"direct": {"tcp_bulk_gbps": [1.0]}, "other": {"udp_1flow_pps": [1.0]}})
    text = format_table(summary, ["direct"], {}, {})
    assert "TCP bulk, 1 stream" in text and "UDP echo" not in text


def test_ratios_against_direct_and_the_spec_target_verdict():
    summary = summarize({"direct": {"tcp_bulk_gbps": [10.0], "udp_1flow_pps": [0.0]},
                         "portunus-splice": {"tcp_bulk_gbps": [7.0], "udp_1flow_pps": [5.0]},
                         "client-splice": {"tcp_bulk_gbps": [5.0]}})
    rat = ratios(summary)
    assert rat == {"portunus-splice/direct:tcp_bulk_gbps": pytest.approx(0.7),
                   "client-splice/direct:tcp_bulk_gbps": pytest.approx(0.5)}   # direct 0: no ratio
    lines = format_ratios(rat)
    assert lines[0].endswith("0.700   (§11 target >= 0.60: PASS)")
    assert lines[1].endswith("0.500   (§11 target >= 0.60: FAIL)")
    other = format_ratios({"portunus-userspace/direct:udp_1flow_pps": 0.4})
    assert other == ["ratio portunus-userspace/direct:udp_1flow_pps           0.400"]


def test_compare_throughput_fails_only_beyond_the_threshold():
    rows, missing = compare(_current(direct__tcp_bulk_gbps=76.0, direct__udp_1flow_pps=74.0),
                            _baseline(direct__tcp_bulk_gbps=100.0, direct__udp_1flow_pps=100.0),
                            threshold_pct=25.0)
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["tcp_bulk_gbps"]["regressed"] is False
    assert by_metric["tcp_bulk_gbps"]["change_pct"] == pytest.approx(-24.0)
    assert by_metric["udp_1flow_pps"]["regressed"] is True
    assert missing == []


def test_compare_latency_is_worse_when_higher():
    rows, _ = compare(_current(direct__http_keepalive_p50_ms=1.3, direct__http_close_p50_ms=0.5,
                               direct__http_keepalive_p99_ms=9.0),
                      _baseline(direct__http_keepalive_p50_ms=1.0, direct__http_close_p50_ms=1.0,
                                direct__http_keepalive_p99_ms=1.0),
                      threshold_pct=25.0)
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["http_keepalive_p50_ms"]["regressed"] is True
    assert by_metric["http_keepalive_p50_ms"]["better"] == "lower"
    assert by_metric["http_close_p50_ms"]["regressed"] is False      # faster is fine
    assert "http_keepalive_p99_ms" not in by_metric                  # tail latency: not gated


def test_compare_loss_needs_a_point_of_slack_from_a_zero_baseline():
    base = _baseline(direct__udp_1flow_loss_pct=0.0, direct__udp_manyflow_loss_pct=0.0)
    rows, _ = compare(_current(direct__udp_1flow_loss_pct=0.5, direct__udp_manyflow_loss_pct=1.5),
                      base, threshold_pct=25.0)
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["udp_1flow_loss_pct"]["regressed"] is False
    assert by_metric["udp_manyflow_loss_pct"]["regressed"] is True
    assert by_metric["udp_manyflow_loss_pct"]["change_pct"] == float("inf")


def test_compare_skips_informational_and_unknown_metrics_and_lists_missing_ones():
    base = _baseline(direct__proxy_startup_s=0.1, direct__no_such_metric=1.0,
                     direct__tcp_bulk_gbps=10.0, client_splice__udp_1flow_pps=5.0,
                     client_splice__udp_1flow_loss_pct=0.0)
    base["summary"]["direct"]["tcp_bulk_rev_gbps"] = {"median": 9.0, "compared": False}
    rows, missing = compare(_current(direct__tcp_bulk_gbps=10.0, direct__proxy_startup_s=9.0),
                            base, threshold_pct=25.0)
    assert [(r["path"], r["metric"], r["regressed"]) for r in rows] == [
        ("direct", "tcp_bulk_gbps", False)]
    assert missing == ["client-splice/udp_1flow_pps", "client-splice/udp_1flow_loss_pct"]


def test_compare_output_rows_missing_summary_and_verdict():
    rows = [{"path": "direct", "metric": "tcp_bulk_gbps", "baseline": 10.0, "current": 5.0,
             "change_pct": -50.0, "better": "higher", "regressed": True}]
    lines = format_compare("bench/baseline.json", 25.0, rows,
                           ["client-splice/udp_1flow_pps", "client-splice/udp_1flow_loss_pct"])
    assert lines[0] == ""
    assert lines[1] == "compare with bench/baseline.json (medians; fail if > 25% worse):"
    assert lines[2] == ("  direct              tcp_bulk_gbps                         10"
                        "             5    -50.0%  REGRESSED")
    assert lines[3] == ("  in baseline but not measured this run (not a failure): "
                        "client-splice (2 metrics)")
    assert lines[4] == "RESULT: regression beyond threshold"
    ok = format_compare("b.json", 10.0, [{**rows[0], "regressed": False}], [])
    assert ok[-1] == "RESULT: no regression beyond threshold" and len(ok) == 4


def test_issues_list_errors_then_problems_per_path():
    lines = format_issues({"haproxy": ["haproxy not installed"]},
                          {"portunus-splice": ["x" * 600]})
    assert lines[:3] == ["", "errors:", "  [haproxy] haproxy not installed"]
    assert lines[3:5] == ["", "problems seen (logs, exit codes, wrk errors):"]
    assert lines[5] == "  [portunus-splice] " + "x" * 500          # cut at 500 characters
    assert format_issues({}, {}) == []


def test_header_shows_options_machine_and_build():
    a = argparse.Namespace(repeat=3, quick=False, tcp_secs=5, wrk_secs=5, wrk_threads=2,
                           wrk_conns=32, udp_count=100000, udp_flows=256)
    meta = {"started": "2026-12-01T09:45:21+00:00", "loadavg_start": (0.24, 0, 0),
            "loadavg_end": (1.5, 0, 0),
            "machine": {"nproc": 2, "cpu_model": "AMD EPYC", "kernel": "6.1", "python": "3.11.7",
                        "git": "abc1234"},
            "portunus": {"argv": ["/d/portunus", "standalone"], "base_argv": ["/d/portunus"],
                         "bin_sha256": "3fe93e492500c512", "listen_host": "127.0.0.1"}}
    lines = format_header(meta, a)
    assert lines == [
        "Portunus bench  2026-12-01T09:45:21+00:00  repeat=3  tcp=5s wrk=5s (-t2 -c32) "
        "udp=100000x64B/256 flows; median ±half-range",
        "machine: 2 cpu AMD EPYC, kernel 6.1, python 3.11.7, git abc1234; loadavg start 0.24 "
        "end 1.50",
        "portunus: /d/portunus  sha256 3fe93e492500c512 built -  listen_host 127.0.0.1",
    ]
    a.repeat, a.quick = 1, True
    del meta["portunus"]
    lines = format_header(meta, a)
    assert len(lines) == 2 and "repeat=1  quick tcp=5s" in lines[0]
    assert lines[0].endswith("flows; median")
    a.origin = "nginx"
    meta["host_busy_pct_before"] = 42.4
    meta["machine"]["note"] = "loaded: suites running"
    lines = format_header(meta, a)
    assert lines[0].endswith("flows; median; http origin nginx")
    assert lines[1].endswith("end 1.50; host busy before 42 %; note: loaded: suites running")
