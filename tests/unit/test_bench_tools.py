"""bench/portbench parsers of iperf3 JSON and wrk text, on canned outputs (no tools run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench import BenchError  # noqa: E402
from portbench.tools import parse_iperf, parse_wrk, percentile, udp_result  # noqa: E402

IPERF_OK = {
    "start": {"connecting_to": {"host": "127.0.0.1", "port": 40001}},
    "intervals": [],
    "end": {
        "sum_sent": {"bytes": 6_250_000_000, "bits_per_second": 10.0e9, "retransmits": 3},
        "sum_received": {"bytes": 6_240_000_000, "bits_per_second": 9.984e9},
        "cpu_utilization_percent": {"host_total": 51.5, "remote_total": 30.25},
    },
}

WRK_OUT = """\
Running 5s test @ http://127.0.0.1:40002/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   320.50us  100.20us   5.10ms   90.00%
    Req/Sec    45.12k     2.01k   50.00k    70.00%
  Latency Distribution
     50%  300.00us
     75%  350.00us
     90%  420.00us
     99%    1.20ms
  449000 requests in 5.00s, 40.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  89800.12
Transfer/sec:      8.00MB
"""


def test_iperf_receiver_rate_bytes_retransmits_and_cpu():
    r = parse_iperf(json.dumps(IPERF_OK))
    assert r == {"gbps": pytest.approx(9.984), "bytes": 6_240_000_000, "retransmits": 3,
                 "cpu": {"host_total": 51.5, "remote_total": 30.25}}


def test_iperf_without_sender_sum_has_no_retransmits():
    doc = {"end": {"sum_received": {"bits_per_second": 1e9}}}
    r = parse_iperf(json.dumps(doc))
    assert r["gbps"] == pytest.approx(1.0)
    assert r["bytes"] is None and r["retransmits"] is None and r["cpu"] is None


def test_iperf_error_field_is_reported_with_its_text():
    doc = {"start": {}, "intervals": [], "end": {},
           "error": "unable to connect to server: Connection refused"}
    with pytest.raises(BenchError, match="iperf3: unable to connect to server"):
        parse_iperf(json.dumps(doc), rc=1)


def test_iperf_output_that_is_not_json_names_rc_and_output():
    with pytest.raises(BenchError, match=r"not JSON \(rc=1\): iperf3: error - bad option"):
        parse_iperf("iperf3: error - bad option", rc=1, err="")


def test_iperf_json_without_receiver_sum_is_an_error_not_a_crash():
    with pytest.raises(BenchError, match="no end.sum_received"):
        parse_iperf(json.dumps({"end": {}}))
    with pytest.raises(BenchError, match="not a JSON object"):
        parse_iperf("[1, 2]")


def test_wrk_rate_latency_percentiles_in_ms_and_error_counts():
    r = parse_wrk(WRK_OUT)
    assert r["rps"] == pytest.approx(89800.12)
    assert r["p50_ms"] == pytest.approx(0.3)
    assert r["p75_ms"] == pytest.approx(0.35)
    assert r["p90_ms"] == pytest.approx(0.42)
    assert r["p99_ms"] == pytest.approx(1.2)
    assert r["requests"] == 449000
    assert r["socket_errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 1}
    assert r["non_2xx"] == 5


@pytest.mark.parametrize("text, ms", [("850.00us", 0.85), ("2.50ms", 2.5), ("1.05s", 1050.0),
                                      ("1.00m", 60_000.0)])
def test_wrk_latency_units(text, ms):
    out = f"     99%  {text}\nRequests/sec:  10.00\n"
    assert parse_wrk(out)["p99_ms"] == pytest.approx(ms)


def test_wrk_clean_run_has_no_errors_and_no_non_2xx():
    out = "\n".join(line for line in WRK_OUT.splitlines()
                    if not line.lstrip().startswith(("Socket errors", "Non-2xx")))
    r = parse_wrk(out)
    assert r["socket_errors"] == {} and r["non_2xx"] == 0


def test_wrk_output_without_a_rate_is_an_error_quoting_the_output():
    with pytest.raises(BenchError, match="cannot parse wrk output: unable to connect"):
        parse_wrk("unable to connect to 127.0.0.1:40002 Connection refused\n")


def test_percentile_is_the_sample_at_rank_n_times_p():
    values = [float(x) for x in range(100, 0, -1)]        # unsorted on purpose
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_udp_result_loss_and_rate():
    r = udp_result(sent=1000, received=950, errors=2, stalls=1, elapsed=0.5)
    assert r["pps"] == pytest.approx(1900.0)
    assert r["loss_pct"] == pytest.approx(5.0)
    assert (r["sent"], r["received"], r["errors"], r["stalls"]) == (1000, 950, 2, 1)
    assert udp_result(0, 0, 0, 0, 1e-6)["loss_pct"] == 0.0
