"""bench/portbench "where the CPU goes" (issue 15): the user/kernel split of the proxy's CPU
from /proc/PID/stat, the syscall count from `perf stat -x,` output, the per-unit figures the
runner records, and the extra report table. Pure parts, fed with recorded text; nothing is
started (the perf counter itself: tests/integration/test_bench_syscount.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench.cli import parse_args  # noqa: E402
from portbench.procs import stat_fields_of, tree_cpu_secs_from, tree_cpu_split_from  # noqa: E402
from portbench.report import (CPU_SPLIT, METRICS, SPLIT_METRICS, compare, cpu_split,  # noqa: E402
                              format_cpu_split, format_table, option_mismatch, split_metric,
                              summarize)
from portbench.runner import Runner  # noqa: E402
from portbench.syscount import EVENT, parse_perf_stat_csv, perf_argv  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")

# /proc/PID/stat lines recorded on the bench machine (Linux 6.18, CLK_TCK 100)
NGINX_WORKER = ("11514 (nginx) S 11512 11509 10199 0 -1 4194624 978 0 2 0 9 22 0 0 20 0 1 0 "
                "3188465 15347712 1825 18446744073709551615 94242279944192 94242280727665 "
                "140721175147520 0 0 0 0 1073745920 402745863 1 0 0 17 1 0 0 0 0 0 "
                "94242280962128 94242281063200 94242665836544 140721175149212 140721175149276 "
                "140721175149276 140721175150568 0\n")
# a command name with spaces and parentheses in it (an executable called "w) (x y")
ODD_NAME = ("14611 (w) (x y) S 1 14607 10277 0 -1 4194304 140 0 0 0 0 0 0 0 20 0 1 0 3206919 "
            "2990080 407 18446744073709551615 94577845743616 94577845761545 140726097911552 0 0 "
            "0 0 6 0 1 0 0 17 0 0 0 0 0 0 94577845775632 94577845776896 94577949110272 "
            "140726097918654 140726097918678 140726097918678 140726097919970 0\n")
# a socat parent of session 10277 that has reaped children: utime 7 stime 3 cutime 40 cstime 25
SOCAT_PARENT = ("14700 (socat) S 1 10277 10277 0 -1 4194560 300 0 0 0 7 3 40 25 20 0 1 0 "
                "3207000 9000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 "
                "0 0 0 0 0 0 0 0 0 0\n")


def test_stat_fields_split_at_the_last_parenthesis():
    f = stat_fields_of(NGINX_WORKER)
    assert f[0] == "S" and f[3] == "10199" and (f[11], f[12], f[13], f[14]) == ("9", "22", "0", "0")
    g = stat_fields_of(ODD_NAME)
    assert g[0] == "S" and g[1] == "1" and g[3] == "10277"      # ") (x y)" is the name's
    assert stat_fields_of("garbage without the name") is None
    assert stat_fields_of("") is None


def test_split_is_user_and_kernel_ticks_of_the_session_incl_reaped_children():
    stats = [stat_fields_of(x) for x in (NGINX_WORKER, ODD_NAME, SOCAT_PARENT)]
    # session 10199: the nginx worker alone, 9 user and 22 kernel ticks
    assert tree_cpu_split_from(stats, 10199) == pytest.approx((9 / CLK, 22 / CLK))
    # session 10277: the odd-named process (0, 0) + socat's own 7/3 and its reaped 40/25
    assert tree_cpu_split_from(stats, 10277) == pytest.approx((47 / CLK, 28 / CLK))
    assert tree_cpu_split_from(stats, 1) == (0, 0)
    # the total is the sum of the two parts (what the bench reported before the split)
    for sid in (10199, 10277):
        assert tree_cpu_secs_from(stats, sid) == pytest.approx(sum(tree_cpu_split_from(stats, sid)))


def test_split_skips_malformed_lines():
    stats = [stat_fields_of(NGINX_WORKER), ["Z"], ["S", "1", "2", "10199", "x"],
             ["S", "1", "2", "10199"] + ["0"] * 7 + ["u", "1", "0", "0"]]
    assert tree_cpu_split_from(stats, 10199) == pytest.approx((9 / CLK, 22 / CLK))


# perf stat -x, -o FILE output, recorded (perf 6.1): a window switched on and off through
# --control, a plain run, and the ways it says it did not count
PERF_WINDOW = ("# started on Tue Dec  1 18:31:59 2026\n\n"
               "261982,,raw_syscalls:sys_enter,149549895,100.00,,Events disabled\n"
               "Events enabled\nEvents disabled\n")
PERF_PLAIN = "29,,raw_syscalls:sys_enter,806601,100.00,,\n"


@pytest.mark.parametrize("text, n", [
    (PERF_WINDOW, 261982),
    (PERF_PLAIN, 29),
    ("0,,raw_syscalls:sys_enter,0,100.00,,\n", 0),
    ("1234.00,,raw_syscalls:sys_enter,5,100.00,,\n", 1234),
    ("<not counted>,,raw_syscalls:sys_enter,0,100.00,,\n", 0),     # the task never ran
    ("<not supported>,,raw_syscalls:sys_enter,0,100.00,,\n", None),
    ("17,,raw_syscalls:sys_exit,5,100.00,,\n", None),           # another event
    ("event syntax error: 'raw_syscalls:sys_enter'\n", None),
    ("", None),
])
def test_perf_stat_csv_count(text, n):
    assert parse_perf_stat_csv(text) == n


def test_perf_argv_counts_the_pids_with_the_counter_off_until_enabled(tmp_path):
    argv = perf_argv([10, 20], tmp_path / "c", tmp_path / "a", tmp_path / "o.csv")
    assert argv[:2] == ["perf", "stat"] and argv[argv.index("-e") + 1] == EVENT
    assert argv[argv.index("-D") + 1] == "-1" and argv[argv.index("-x") + 1] == ","
    assert argv[argv.index("--control") + 1] == f"fifo:{tmp_path / 'c'},{tmp_path / 'a'}"
    assert argv[argv.index("-p") + 1] == "10,20" and argv[argv.index("-o") + 1].endswith("o.csv")


def _runner(syscalls: bool = False) -> Runner:
    return Runner(SimpleNamespace(syscalls=syscalls), procs=None, workdir=Path("/nonexistent"))


def test_runner_records_total_user_kernel_and_syscalls_per_unit():
    r = _runner()
    r.last_cpu_secs, r.last_cpu_split, r.last_syscalls = 0.75, (0.25, 0.5), 200_000
    r.add_per_unit("portunus-splice", "http_close", "us_per_req", 10_000, 1e6)
    s = r.samples["portunus-splice"]
    assert s["http_close_proxy_cpu_us_per_req"] == [pytest.approx(75.0)]
    assert s["http_close_proxy_user_us_per_req"] == [pytest.approx(25.0)]
    assert s["http_close_proxy_sys_us_per_req"] == [pytest.approx(50.0)]
    assert s["http_close_proxy_syscalls_per_req"] == [pytest.approx(20.0)]
    # a probe's own window (iperf3 search): ms per GB, no syscalls counted
    r.add_per_unit("nginx", "tcp_bulk", "ms_per_gb", 2.0, 1e3,
                   window={"proxy_cpu_secs": 0.4, "proxy_cpu_split_secs": [0.1, 0.3],
                           "proxy_syscalls": None})
    assert r.samples["nginx"] == {"tcp_bulk_proxy_cpu_ms_per_gb": [pytest.approx(200.0)],
                                  "tcp_bulk_proxy_user_ms_per_gb": [pytest.approx(50.0)],
                                  "tcp_bulk_proxy_sys_ms_per_gb": [pytest.approx(150.0)]}
    # no unit of work, or no proxy (direct): nothing
    r.add_per_unit("haproxy", "http_keepalive", "us_per_req", 0, 1e6)
    r.last_cpu_secs = r.last_cpu_split = r.last_syscalls = None
    r.add_per_unit("direct", "http_keepalive", "us_per_req", 1000, 1e6)
    assert "haproxy" not in r.samples and "direct" not in r.samples
    for m in (x for path in r.samples.values() for x in path):
        assert m in METRICS, m                   # every name the runner makes is a metric


def test_runner_syscalls_off_unless_asked_and_said_once(capsys):
    r = _runner(syscalls=False)
    assert r.syscalls_off and r._syscall_counter(SimpleNamespace(name="x")) is None
    r = _runner(syscalls=True)
    assert r.syscalls_off is None
    r.syscalls_disabled("perf is not installed")
    r.syscalls_disabled("a later failure")
    assert r.syscalls_off == "perf is not installed"
    assert capsys.readouterr().err.count("syscalls not counted") == 1


def test_split_metrics_exist_for_every_cpu_figure_and_are_never_compared():
    for key, label, prefix, suffix, unit, dec in CPU_SPLIT:
        assert split_metric(prefix, "cpu", suffix) in METRICS          # the existing total
        for part in ("user", "sys", "syscalls"):
            m = split_metric(prefix, part, suffix)
            assert m in SPLIT_METRICS and METRICS[m][3] is False, m
    assert len(SPLIT_METRICS) == 3 * len(CPU_SPLIT)
    base = {"summary": summarize({"haproxy": {"http_close_proxy_user_us_per_req": [5.0],
                                              "http_close_proxy_syscalls_per_req": [20.0]}})}
    cur = summarize({"haproxy": {"http_close_proxy_user_us_per_req": [50.0],
                                 "http_close_proxy_syscalls_per_req": [200.0]}})
    assert compare(cur, base, 25.0) == ([], [])             # 10x worse: not gated
    assert option_mismatch({"syscalls": False}, {"syscalls": True}) == ["syscalls: False -> True"]
    assert option_mismatch({}, {"syscalls": True}) == []    # older baselines did not record it


SAMPLES = {
    "direct": {"http_keepalive_rps": [100_000.0]},
    "portunus-splice": {"http_keepalive_proxy_cpu_us_per_req": [16.0],
                        "http_keepalive_proxy_user_us_per_req": [4.0, 3.0, 5.0],
                        "http_keepalive_proxy_sys_us_per_req": [12.0],
                        "http_keepalive_proxy_syscalls_per_req": [4.1],
                        "http_close_proxy_user_us_per_req": [27.0],
                        "http_close_proxy_sys_us_per_req": [81.0],
                        "http_close_proxy_syscalls_per_req": [19.12]},
    "haproxy-1t": {"http_keepalive_proxy_user_us_per_req": [1.0],
                   "http_keepalive_proxy_sys_us_per_req": [13.0],
                   "http_close_proxy_user_us_per_req": [5.0],
                   "http_close_proxy_sys_us_per_req": [70.0]},
}


def test_cpu_split_data_per_figure_and_path():
    split = cpu_split(summarize(SAMPLES), ["direct", "portunus-splice", "haproxy-1t", "nginx"])
    assert set(split) == {"keepalive", "newconn"}           # figures no path has are left out
    ka = split["keepalive"]
    assert ka["unit"] == "us" and ka["user"] == {"portunus-splice": 4.0, "haproxy-1t": 1.0}
    assert ka["kernel"] == {"portunus-splice": 12.0, "haproxy-1t": 13.0}
    assert ka["total"] == {"portunus-splice": 16.0}
    assert ka["syscalls"] == {"portunus-splice": 4.1}
    assert split["newconn"]["syscalls"] == {"portunus-splice": 19.12}


def test_cpu_split_table_rows_columns_share_and_the_note():
    paths = ["direct", "portunus-splice", "haproxy-1t", "nginx"]
    lines = format_cpu_split(cpu_split(summarize(SAMPLES), paths), paths, 256,
                             "perf is not installed")
    assert lines[0].startswith("where the CPU goes")
    assert lines[1] == "| figure | portunus-splice | haproxy-1t |"    # no direct, no empty path
    assert lines[2] == "| --- | ---: | ---: |"
    assert lines[3:9] == [
        "| keep-alive, per request: user µs | 4.0 | 1.0 |",
        "| keep-alive, per request: kernel µs | 12.0 (75 %) | 13.0 (93 %) |",
        "| keep-alive, per request: syscalls | 4.10 | – |",
        "| new connection, per connection: user µs | 27.0 | 5.0 |",
        "| new connection, per connection: kernel µs | 81.0 (75 %) | 70.0 (93 %) |",
        "| new connection, per connection: syscalls | 19.12 | – |"]
    assert lines[9] == "syscalls not counted: perf is not installed" and len(lines) == 10
    assert format_cpu_split({}, paths, 256) == []


def test_cpu_split_table_flows_and_ms_per_gb():
    s = summarize({"nginx": {"udp_iperf_manyflow_proxy_user_us_per_dgram": [0.5],
                             "udp_iperf_manyflow_proxy_sys_us_per_dgram": [1.5],
                             "tcp_bulk_proxy_user_ms_per_gb": [3.0],
                             "tcp_bulk_proxy_sys_ms_per_gb": [97.0],
                             "tcp_bulk_proxy_syscalls_per_gb": [31_000.0]}})
    text = "\n".join(format_cpu_split(cpu_split(s, ["nginx"]), ["nginx"], 16))
    assert "| UDP 16 flows (iperf3), per datagram: user µs | 0.50 |" in text
    assert "| UDP 16 flows (iperf3), per datagram: kernel µs | 1.50 (75 %) |" in text
    assert "| TCP bulk, per GB: kernel ms | 97 (97 %) |" in text
    assert "| TCP bulk, per GB: syscalls | 31,000 |" in text


def test_main_table_leaves_the_split_rows_to_their_own_table():
    text = format_table(summarize(SAMPLES), ["portunus-splice", "haproxy-1t"], {}, {})
    assert "Proxy CPU per keep-alive req" in text
    assert "utime" not in text and "syscalls" not in text


def test_syscalls_flag_is_off_by_default():
    assert parse_args([]).syscalls is False
    assert parse_args(["--quick", "--syscalls"]).syscalls is True
