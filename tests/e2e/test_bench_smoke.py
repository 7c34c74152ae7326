"""CI smoke of bench/run.py (issue 15): a --quick run with tiny durations over EVERY path of
the runner (direct, portunus-*, client-*, haproxy, haproxy-1t, nginx, rinetd, socat), so that
no bench path rots. It checks that each path starts, forwards and yields figures, and the
JSON shape; it asserts nothing about speed (figures come from a real bench run, SPEC §11).

The product is PORTUNUS_BIN when set (./build.sh test), else `python -m portunus` from this
tree. The peers must be installed: a missing one skips here and fails under
PORTUNUS_REQUIRE_TOOLS=1 (CI installs them in .ci/run)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT, require_tool

RUN_PY = ROOT / "bench" / "run.py"
sys.path.insert(0, str(ROOT / "bench"))

from portbench.paths import NGINX_STREAM_MODULE  # noqa: E402
from portbench.report import (CPU_SPLIT, DEFAULT_PATHS, GOALS, FIGURES,  # noqa: E402
                              NOT_APPLICABLE, PORTUNUS_PATHS, split_metric)

EVERY_PATH = ["direct", "portunus-splice", "portunus-userspace", "client-splice",
              "client-userspace", "haproxy", "haproxy-1t", "nginx", "rinetd", "socat"]
TCP_FIGURES = ["tcp_bulk_gbps", "http_keepalive_rps", "http_close_rps", "http_idle_rtt_p50_us",
               "http_idle_rtt_p99_us"]
UDP_FIGURES = ["udp_1flow_pps", "udp_1flow_loss_pct", "udp_manyflow_pps",
               "udp_manyflow_loss_pct", "udp_iperf_1flow_pps", "udp_iperf_1flow_loss_pct",
               "udp_iperf_manyflow_pps", "udp_iperf_manyflow_loss_pct", "udp_iperf_1flow_probes",
               "udp_iperf_manyflow_probes"]
CPU_FIGURES = ["proxy_startup_s", "proxy_peak_rss_mib", "tcp_bulk_proxy_cpu_ms_per_gb", "http_keepalive_proxy_cpu_us_per_req",
               "http_close_proxy_cpu_us_per_req"]
UDP_CPU_FIGURES = ["udp_1flow_proxy_cpu_us_per_dgram", "udp_manyflow_proxy_cpu_us_per_dgram",
                   "udp_iperf_1flow_proxy_cpu_us_per_dgram",
                   "udp_iperf_manyflow_proxy_cpu_us_per_dgram"]
# every CPU figure also comes split into the proxy's user and kernel time
CPU_FIGURES += [split_metric(prefix, part, suffix) for _, _, prefix, suffix, _, _ in CPU_SPLIT
                if not prefix.startswith("udp") for part in ("user", "sys")]
UDP_CPU_FIGURES += [split_metric(prefix, part, suffix) for _, _, prefix, suffix, _, _ in CPU_SPLIT
                    if prefix.startswith("udp") for part in ("user", "sys")]


def _bin() -> str:
    binary = os.environ.get("PORTUNUS_BIN")
    return binary if binary else shlex.join([sys.executable, "-m", "portunus"])


def _run_bench(argv: list[str], timeout: float) -> tuple[str, str]:
    """Run bench/run.py in its own process group; on a timeout or failure everything it started
    goes (SIGTERM: the runner stops its own children; SIGKILL after 10 s). Asserts exit 0."""
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert p.returncode == 0, f"rc={p.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout, stderr


def _require_peers() -> None:
    for tool in ("iperf3", "wrk", "haproxy", "nginx", "rinetd", "socat"):
        require_tool(tool)
    if not Path(NGINX_STREAM_MODULE).exists():
        msg = f"nginx stream module {NGINX_STREAM_MODULE} is not installed (libnginx-mod-stream)"
        if IN_CI:
            pytest.fail(msg + " (CI must install it in .ci/run)")
        pytest.skip(msg)


@pytest.mark.timeout(200)
def test_quick_bench_over_every_path_yields_figures_and_the_issue_tables(tmp_path):
    _require_peers()
    assert EVERY_PATH == DEFAULT_PATHS         # the smoke covers the whole default run
    out = tmp_path / "smoke.json"
    argv = [sys.executable, str(RUN_PY), "--quick", "--bin", _bin(), "--out", str(out),
            "--paths", ",".join(EVERY_PATH), "--tcp-secs", "1", "--wrk-secs", "1",
            "--rtt-count", "50", "--udp-count", "2000", "--udp-secs", "0.5", "--udp-flows", "16",
            "--udp-iperf-start", "5000", "--udp-iperf-probes", "2", "--max-total-secs", "150"]
    stdout, stderr = _run_bench(argv, timeout=190)

    doc = json.loads(out.read_text())
    assert {"meta", "summary", "ratios", "side_by_side", "goals", "errors", "problems",
            "details", "table", "issue_tables", "interrupted", "where_cpu_goes"} <= set(doc)
    assert doc["errors"] == {} and doc["interrupted"] is False
    # a rotten path shows as a bad exit, a traceback or a fast path not taken; wrk socket
    # errors on a loaded machine are tolerated here
    for path, problems in doc["problems"].items():
        for text in problems:
            assert not any(w in text for w in ("exit code", "exited", "splice_selected",
                                               "Traceback", "took")), (path, text)
    assert doc["meta"]["options"]["quick"] is True
    assert doc["meta"]["backends"]["http_origin"] == "nginx"
    summary = doc["summary"]
    assert set(summary) == set(EVERY_PATH)
    for path in EVERY_PATH:
        udp = "udp" not in NOT_APPLICABLE.get(path, set())
        want = TCP_FIGURES + (UDP_FIGURES if udp else [])
        if path != "direct":
            want += CPU_FIGURES + (UDP_CPU_FIGURES if udp else [])
        for m in want:
            cell = summary[path].get(m)
            assert cell is not None, f"{path} has no {m}: {sorted(summary[path])}"
            assert set(cell) >= {"median", "min", "max", "samples", "unit", "better", "compared"}
            assert len(cell["samples"]) == 1
        for m in ("tcp_bulk_gbps", "http_keepalive_rps", "http_close_rps"):
            assert summary[path][m]["median"] > 0, (path, m)
        if udp:
            assert summary[path]["udp_1flow_pps"]["median"] > 0, path
            _check_iperf_udp(path, summary[path], doc["details"][path][0])
        else:
            assert "udp_1flow_pps" not in summary[path]
            assert not any(m.startswith("udp_iperf") for m in summary[path])
    # every path appears in the side-by-side rows it can carry; the peers have a best one
    sbs = doc["side_by_side"]
    assert set(sbs) == {f[0] for f in FIGURES}
    assert set(sbs["bulk"]["values"]) == set(EVERY_PATH)
    assert set(sbs["udp1"]["values"]) == {"direct", "nginx"} | PORTUNUS_PATHS
    assert set(sbs["udp1_iperf"]["values"]) == {"direct", "nginx"} | PORTUNUS_PATHS
    assert set(sbs["udpn_iperf"]["values"]) == {"direct", "nginx"} | PORTUNUS_PATHS
    assert sbs["udp1_iperf"]["best_peer"][0] == "nginx"
    assert sbs["bulk"]["best_peer"][0] in {"haproxy", "haproxy-1t", "nginx", "rinetd", "socat"}
    assert sbs["udp1"]["best_peer"][0] == "nginx"
    assert set(sbs["bulk"]["x_best_peer"]) == PORTUNUS_PATHS
    assert len(doc["goals"]) == len(GOALS) * len(PORTUNUS_PATHS)
    assert all(g["met"] in (True, False) for g in doc["goals"])       # every figure measured
    # the printed side-by-side table has a row per figure and a column per path
    head = [ln for ln in stdout.splitlines() if ln.startswith("| figure | direct")][0]
    assert head.strip("| ").split(" | ") == ["figure"] + EVERY_PATH + ["best peer"]
    assert "goals of issue 15" in stdout
    assert "| UDP 64 B, 1 flow (iperf3), k datagrams/s |" in stdout
    assert "| UDP 64 B, 16 flows (iperf3), k datagrams/s |" in stdout
    # where the CPU goes: user and kernel time per unit for every proxy path, no syscalls
    # (not asked)
    split = doc["where_cpu_goes"]
    assert set(split["keepalive"]["user"]) == set(EVERY_PATH) - {"direct"}
    assert set(split["udp1_iperf"]["kernel"]) == {"nginx"} | PORTUNUS_PATHS
    assert not any(row["syscalls"] for row in split.values())
    assert doc["meta"]["syscalls"]["asked"] is False
    assert "| keep-alive, per request: kernel µs |" in stdout and ": syscalls |" not in stdout


def _check_iperf_udp(path: str, figures: dict, detail: dict) -> None:
    """The iperf3 rows of one UDP path are sane: a positive received rate that some probe
    of its search measured, a loss in 0..100 %, at most --quick's 2 probes, and each probe
    delivered what iperf3 says it sent less what it lost."""
    for key, flows in (("1flow", 1), ("manyflow", 16)):
        m = f"udp_iperf_{key}"
        pps, loss = figures[f"{m}_pps"]["median"], figures[f"{m}_loss_pct"]["median"]
        assert pps > 0 and 0 <= loss <= 100, (path, m, pps, loss)
        assert 1 <= figures[f"{m}_probes"]["median"] <= 2, (path, m)
        assert figures[f"{m}_max_pps"]["median"] >= pps, (path, m)
        d = detail[m]
        assert d["flows"] == flows and d["pairs"] == (1 if flows == 1 else 2)
        assert d["limit"] in ("sender", "loss", "probes", "no-clean-rate")
        assert pps in [t["pps"] for t in d["trace"]]
        b = d["best"]
        assert b["received"] == b["packets"] - b["lost"] and b["sent"] >= b["received"] > 0
        if path != "direct":
            assert figures[f"{m}_proxy_cpu_us_per_dgram"]["median"] > 0, (path, m)


@pytest.mark.timeout(100)
def test_quick_bench_with_syscalls_counts_them_or_says_why_not(tmp_path):
    """--syscalls on two paths, http only: syscalls per request and per connection for the
    proxy path when perf can count here; otherwise the run still succeeds and says why once.
    Either way the user/kernel split is there and direct (no proxy) has neither."""
    for tool in ("wrk", "nginx"):
        require_tool(tool)
    out = tmp_path / "syscalls.json"
    argv = [sys.executable, str(RUN_PY), "--quick", "--bin", _bin(), "--out", str(out),
            "--only", "http", "--paths", "direct,portunus-splice", "--syscalls",
            "--wrk-secs", "1", "--rtt-count", "50", "--max-total-secs", "60"]
    stdout, stderr = _run_bench(argv, timeout=90)
    doc = json.loads(out.read_text())
    assert doc["errors"] == {} and doc["meta"]["options"]["syscalls"] is True
    s = doc["summary"]["portunus-splice"]
    for kind in ("keepalive", "close"):
        for part in ("user", "sys"):
            assert s[f"http_{kind}_proxy_{part}_us_per_req"]["compared"] is False
        assert s[f"http_{kind}_proxy_user_us_per_req"]["median"] >= 0
    assert not any("_proxy_" in m for m in doc["summary"]["direct"])
    info = doc["meta"]["syscalls"]
    if info["counted"]:
        for kind in ("keepalive", "close"):
            v = s[f"http_{kind}_proxy_syscalls_per_req"]
            assert v["median"] > 1 and v["compared"] is False, (kind, v)
        assert "| keep-alive, per request: syscalls |" in stdout
        assert "syscalls not counted" not in stdout
    else:
        assert info["why_not"] and not any("syscalls" in m for m in s)
        assert stdout.count("syscalls not counted") == 1
