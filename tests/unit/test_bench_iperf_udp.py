"""bench/portbench, the iperf3 UDP rows: the iperf3 -u JSON parser, combining client/server
pairs, splitting flows over pairs, the 0 %-loss rate search (against modelled paths, no
tools run), the kernel drop counters' parsers, and the configs that forward iperf3's TCP
control and UDP data on one port."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from portbench import BenchError  # noqa: E402
from portbench.cli import parse_args  # noqa: E402
from portbench.machine import parse_udp_drops, parse_udp_snmp  # noqa: E402
from portbench.origins import Backends  # noqa: E402
from portbench.paths import ClientPath, nginx_stream_config, ready_ports  # noqa: E402
from portbench.product import iperf_udp_rules, standalone_config  # noqa: E402
from portbench.tools import (IPERF_MAX_STREAMS, combine_udp, iperf_udp_argv,  # noqa: E402
                             parse_iperf_udp, split_flows, zero_loss_search)


def _udp_json(sent=100_000, packets=99_900, lost=12, secs=2.0, **extra) -> str:
    """The shape of `iperf3 -u -J` 3.12 client output (the fields the parser reads)."""
    doc = {"start": {"test_start": {"protocol": "UDP", "blksize": 64}}, "intervals": [],
           "end": {"streams": [{"udp": {}}],
                   "sum": {"packets": packets, "lost_packets": lost, "seconds": secs},
                   "sum_sent": {"packets": sent, "lost_packets": 0, "seconds": secs},
                   "sum_received": {"packets": packets, "lost_packets": lost, "seconds": secs,
                                    "bytes": (packets - lost) * 64},
                   "cpu_utilization_percent": {"host_total": 80.5, "remote_total": 40.25}}}
    doc.update(extra)
    return json.dumps(doc)


# --------------------------------------------------------------------------
# parse_iperf_udp / combine_udp
# --------------------------------------------------------------------------

def test_parse_takes_the_receivers_loss_and_counts_the_tail_apart():
    r = parse_iperf_udp(_udp_json(sent=100_000, packets=99_900, lost=12, secs=2.0))
    assert r["sent"] == 100_000 and r["packets"] == 99_900 and r["lost"] == 12
    assert r["received"] == 99_888
    assert r["tail"] == 100                    # after the last datagram seen: not loss
    assert r["seconds"] == 2.0
    assert r["client_cpu_pct"] == 80.5 and r["server_cpu_pct"] == 40.25


@pytest.mark.parametrize("out, words", [
    ("", "not JSON"),
    ("iperf3: error - unable to connect to server", "not JSON"),
    ('{"start": {}, "end": ', "not JSON"),                              # cut short
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"start": {}, "end": {}, "error": "unable to connect to server: refused"}),
     "unable to connect"),
    (json.dumps({"start": {}, "end": {"sum_received": {"bytes": 1, "bits_per_second": 8}}}),
     "packet counts"),                                                  # a TCP result
    (json.dumps({"end": {"sum_received": {"packets": "x", "lost_packets": 0, "seconds": 1},
                         "sum_sent": {"packets": 1}}}), "packet counts"),
    (json.dumps({"end": {"sum_received": None, "sum_sent": {}}}), "packet counts"),
    (_udp_json(packets=10, lost=11), "impossible"),
    (_udp_json(secs=0), "impossible"),
])
def test_malformed_or_failed_output_is_a_clear_bench_error(out, words):
    with pytest.raises(BenchError, match=words):
        parse_iperf_udp(out, rc=1, err="")


def test_combining_pairs_sums_counts_over_the_longest_duration():
    a = parse_iperf_udp(_udp_json(sent=1000, packets=1000, lost=10, secs=2.0))
    b = parse_iperf_udp(_udp_json(sent=3000, packets=2990, lost=0, secs=2.5))
    c = combine_udp([a, b])
    assert (c["sent"], c["packets"], c["lost"], c["received"], c["tail"]) == (4000, 3990, 10,
                                                                               3980, 10)
    assert c["seconds"] == 2.5 and c["pps"] == pytest.approx(3980 / 2.5)
    assert c["sent_pps"] == pytest.approx(4000 / 2.5)
    assert c["loss_pct"] == pytest.approx(100 * 10 / 3990)
    assert c["pairs"] == 2 and c["client_cpu_pct"] == [80.5, 80.5]
    with pytest.raises(BenchError):
        combine_udp([])


def test_no_datagram_at_all_reads_as_zero_rate_and_zero_loss_not_a_crash():
    c = combine_udp([parse_iperf_udp(_udp_json(sent=0, packets=0, lost=0, secs=1.0))])
    assert c["pps"] == 0 and c["loss_pct"] == 0.0


# --------------------------------------------------------------------------
# flows over iperf3 pairs, the client command
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flows, pairs, want", [
    (1, 1, [1]), (256, 2, [128, 128]), (16, 2, [8, 8]), (5, 2, [3, 2]), (128, 1, [128])])
def test_flows_split_evenly_over_pairs(flows, pairs, want):
    assert split_flows(flows, pairs) == want


@pytest.mark.parametrize("flows, pairs", [(257, 2), (129, 1), (1, 2), (0, 1), (4, 0)])
def test_a_split_iperf3_cannot_run_is_refused(flows, pairs):
    with pytest.raises(BenchError):
        split_flows(flows, pairs)
    assert IPERF_MAX_STREAMS == 128


def test_client_argv_paces_each_stream_in_payload_bits():
    argv = iperf_udp_argv(41001, 128, 500.0, 2, 64, "2M")
    assert argv[:3] == ["iperf3", "-c", "127.0.0.1"]
    opt = {k: argv[argv.index(k) + 1] for k in ("-p", "-l", "-P", "-b", "-t", "-w")}
    assert opt["-p"] == "41001" and opt["-l"] == "64" and opt["-P"] == "128"
    assert opt["-b"] == str(500 * 64 * 8)              # -b is per stream, payload bits/s
    assert opt["-t"] == "2" and opt["-w"] == "2M"
    assert "-u" in argv and "-J" in argv
    assert "-w" not in iperf_udp_argv(41001, 1, 1000.0, 1, 64, None)


# --------------------------------------------------------------------------
# zero_loss_search against modelled paths
# --------------------------------------------------------------------------

class ModelPath:
    """A path that loses nothing up to `clean_below` offered datagrams/s and loses beyond
    it; the sender cannot send more than `sender_max`; `noisy` offers lose anyway."""

    def __init__(self, clean_below: float, sender_max: float = 1e9, noisy=()):
        self.clean_below, self.sender_max, self.noisy = clean_below, sender_max, set(noisy)
        self.offers: list[float] = []

    def __call__(self, pps: float) -> dict:
        self.offers.append(pps)
        sent = min(pps, self.sender_max)
        lossy = sent > self.clean_below or len(self.offers) in self.noisy
        lost = 0.01 * sent if lossy else 0.0
        return {"pps": sent - lost, "sent_pps": sent, "loss_pct": 100 * lost / sent,
                "lost": int(lost), "tail": 0, "extra": "not in the trace"}


def test_ramp_then_bisection_brackets_the_clean_rate_within_the_resolution():
    m = ModelPath(clean_below=130_000)
    r = zero_loss_search(m, 50_000, 10, resolution=0.1)
    assert r["limit"] == "loss" and r["loss_pct"] == 0.0
    assert 130_000 / 1.1 <= r["pps"] <= 130_000
    assert m.offers[:3] == [50_000, 100_000, 200_000]              # ramp x2 until a loss
    assert m.offers[3] == 150_000                                   # then halfway
    assert r["probes"] == len(m.offers) == len(r["trace"]) < 10
    assert r["trace"][0] == {"offered_pps": 50_000, "pps": 50_000, "sent_pps": 50_000,
                             "loss_pct": 0.0, "lost": 0, "tail": 0}
    assert r["best"]["pps"] == r["pps"] and r["offered_pps"] <= 130_000
    assert r["max_pps"] == pytest.approx(0.99 * 200_000)          # the lossy 200k probe
    assert r["max_pps_loss_pct"] == pytest.approx(1.0)


def test_a_sender_that_falls_short_ends_the_search_as_the_limit():
    m = ModelPath(clean_below=1e9, sender_max=150_000)
    r = zero_loss_search(m, 50_000, 10)
    assert r["limit"] == "sender" and r["pps"] == 150_000 and r["loss_pct"] == 0.0
    assert m.offers == [50_000, 100_000, 200_000]


def test_a_lossy_start_halves_down_to_a_clean_rate_then_bisects_up():
    m = ModelPath(clean_below=20_000)
    r = zero_loss_search(m, 50_000, 8, resolution=0.1)
    assert m.offers[:3] == [50_000, 25_000, 12_500]
    assert m.offers[3] == 18_750                                    # between 12.5k and 25k
    assert r["loss_pct"] == 0.0 and r["pps"] <= 20_000 and r["limit"] in ("loss", "probes")


def test_the_probe_budget_bounds_the_search():
    m = ModelPath(clean_below=1e9)
    r = zero_loss_search(m, 1000, 3)
    assert len(m.offers) == 3 and r["limit"] == "probes" and r["pps"] == 4000
    one = zero_loss_search(ModelPath(clean_below=1e9), 5000, 1)
    assert one["probes"] == 1 and one["pps"] == 5000


def test_without_any_clean_rate_the_least_lossy_probe_is_reported_with_its_loss():
    m = ModelPath(clean_below=0)
    r = zero_loss_search(m, 8000, 10, min_pps=1000)
    assert m.offers == [8000, 4000, 2000, 1000]                     # not below min_pps
    assert r["limit"] == "no-clean-rate" and r["loss_pct"] > 0      # the goal sees the loss


def test_a_lossy_blip_below_a_clean_rate_does_not_send_the_search_downwards_forever():
    m = ModelPath(clean_below=100_000, noisy={2})                   # 2nd probe loses anyway
    r = zero_loss_search(m, 40_000, 8)
    assert r["loss_pct"] == 0.0 and r["pps"] >= 40_000
    assert all(o <= 80_000 for o in m.offers[2:])                    # bounded by the blip


def test_a_loss_tolerance_counts_small_loss_as_clean():
    m = ModelPath(clean_below=0)                                     # always 1 % loss
    r = zero_loss_search(m, 50_000, 3, max_loss_pct=2.0)
    assert r["loss_pct"] == pytest.approx(1.0) and r["limit"] == "probes"
    assert r["offered_pps"] == 200_000


@pytest.mark.parametrize("start, probes", [(0, 3), (-5, 3), (1000, 0)])
def test_a_search_that_cannot_start_is_a_bench_error(start, probes):
    with pytest.raises(BenchError):
        zero_loss_search(ModelPath(1e9), start, probes)


# --------------------------------------------------------------------------
# where the kernel dropped datagrams
# --------------------------------------------------------------------------

SNMP = """\
Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
Udp: 345989694 1603 2710282 321071822 2710281 0 0
UdpLite: InDatagrams NoPorts
UdpLite: 0 0
"""

PROC_NET_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   73: 0100007F:B22A 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4288 2 00000000ae99dcde 32897
   74: 0100007F:B22A 0100007F:985A 01 00000000:00000000 00:00000000 00000000  1000        0 4289 2 00000000ae99dcdf 3
  208: 0100007F:8260 0100007F:985A 01 00000000:00000000 00:00000000 00000000     0        0 4287 2 00000000dc892feb 7
  bad line
"""


def test_snmp_udp_counters_by_name():
    c = parse_udp_snmp(SNMP)
    assert c["RcvbufErrors"] == 2710281 and c["InDatagrams"] == 345989694
    assert parse_udp_snmp("Ip: a\nIp: 1\n") == {}
    assert parse_udp_snmp("Udp: A B\nUdp: 1 x\n") == {}


def test_socket_drops_summed_per_local_port():
    assert parse_udp_drops(PROC_NET_UDP, {0xB22A}) == {0xB22A: 32900}
    assert parse_udp_drops(PROC_NET_UDP, {0x8260, 1}) == {0x8260: 7}
    assert parse_udp_drops("header only\n", {0xB22A}) == {}


# --------------------------------------------------------------------------
# iperf3 control (TCP) and data (UDP) on one port, on every UDP path
# --------------------------------------------------------------------------

FRONTS = Backends(41001, 41002, 41003, 41004)
BACKENDS = Backends(42001, 42002, 42003, 42004)


def test_extra_rules_only_with_a_second_iperf_port():
    assert iperf_udp_rules(FRONTS, BACKENDS) == [
        ("iperf", 41001, 42001, "udp"), ("iperf-b", 41004, 42004, "tcp"),
        ("iperf-b", 41004, 42004, "udp")]
    assert iperf_udp_rules(Backends(1, 2, 3), Backends(4, 5, 6)) == []
    assert FRONTS.iperf_pairs(BACKENDS) == [(41001, 42001), (41004, 42004)]


def test_standalone_config_shares_the_iperf_ports_between_tcp_and_udp_rules():
    text = standalone_config(FRONTS, BACKENDS, "127.0.0.1", 1)
    assert text.count("[[rule]]") == 6
    for port, proto in ((41001, "tcp"), (41001, "udp"), (41004, "tcp"), (41004, "udp")):
        assert (f'protocol = "{proto}"\nlisten_host = "127.0.0.1"\nlisten_port = {port}\n'
                f'target = "127.0.0.1:{port + 1000}"\n') in text
    assert text.count("udp_max_flows = 4096") == 3
    assert len(set(ln for ln in text.splitlines() if ln.startswith("name ="))) == 6


def test_client_rules_push_the_same_extra_rules_apart_from_the_timed_three():
    rules = ClientPath.iperf_rules(FRONTS, BACKENDS)
    assert [(r["listen_port"], r["target"], r["protocol"]) for r in rules] == [
        (41001, "127.0.0.1:42001", "udp"), (41004, "127.0.0.1:42004", "tcp"),
        (41004, "127.0.0.1:42004", "udp")]
    assert [r.get("udp_max_flows") for r in rules] == [4096, None, 4096]
    assert {r["listen_host"] for r in rules} == {"127.0.0.1"}
    assert len(ClientPath.rules(FRONTS, BACKENDS)) == 3
    assert ClientPath.iperf_rules(Backends(1, 2, 3), Backends(4, 5, 6)) == []


def test_nginx_listens_tcp_and_udp_on_both_iperf_ports(tmp_path):
    lines = nginx_stream_config(FRONTS, BACKENDS, tmp_path).splitlines()
    assert ("    server { listen 127.0.0.1:41001 udp rcvbuf=2m; proxy_pass 127.0.0.1:42001; "
            "proxy_timeout 10s; }") in lines
    assert "    server { listen 127.0.0.1:41004 backlog=4096; proxy_pass 127.0.0.1:42004; }" in lines
    assert ("    server { listen 127.0.0.1:41004 udp rcvbuf=2m; proxy_pass 127.0.0.1:42004; "
            "proxy_timeout 10s; }") in lines
    assert lines[-1] == "}"
    udp = [ln for ln in lines if " udp" in ln]
    assert udp and all("rcvbuf=2m" in ln for ln in udp)  # the queue portunus asks for: like for like
    assert not any("rcvbuf" in ln for ln in lines if " udp" not in ln)
    plain = nginx_stream_config(Backends(1, 2, 3), Backends(4, 5, 6), tmp_path)
    assert plain.count("server {") == 3


def test_ready_ports_include_the_iperf_udp_sockets():
    assert ready_ports(FRONTS) == ([41001, 41002, 41004], [41003, 41001, 41004])
    assert ready_ports(Backends(1, 2, 3)) == ([1, 2], [3])


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------

def test_quick_defaults_and_option_checks(capsys):
    q = parse_args(["--quick"])
    assert (q.udp_iperf_secs, q.udp_iperf_probes, q.udp_tools) == (1, 1, ["echo", "iperf3"])
    assert q.max_total_secs == 85
    full = parse_args([])
    assert (full.udp_iperf_secs, full.udp_iperf_probes, full.udp_loss_max_pct) == (2, 7, 0.0)
    assert parse_args(["--udp-tools", "echo", "--udp-flows", "1000"]).udp_flows == 1000
    for bad in (["--udp-tools", "ping"], ["--udp-flows", "300"], ["--udp-flows", "1"],
                ["--udp-iperf-probes", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    capsys.readouterr()


def test_the_end_of_test_icmp_warning_of_an_iperf3_udp_target_is_not_a_problem():
    from portbench.logscan import iperf_udp_icmp, scan_json_lines
    from portbench.paths import iperf_udp_targets
    targets = iperf_udp_targets(BACKENDS)
    assert targets == {"127.0.0.1:42001", "127.0.0.1:42004"}
    lines = [{"level": "warn", "event": "rule.target_failed", "rule": "bench-iperf-udp",
              "target": "127.0.0.1:42001", "index": 0, "reason": "ICMP error"},
             {"level": "warn", "event": "rule.target_failed", "rule": "bench-udp",
              "target": "127.0.0.1:42003", "index": 0, "reason": "ICMP error"},   # the echo
             {"level": "warn", "event": "rule.target_failed", "rule": "bench-iperf-udp",
              "target": "127.0.0.1:42004", "index": 0, "reason": "timeout"},
             {"level": "info", "event": "rule.activated"}]
    text = "\n".join(json.dumps(x) for x in lines)
    assert scan_json_lines(text)[0].startswith("warn:rule.target_failed x3: ")
    kept = scan_json_lines(text, benign=iperf_udp_icmp(targets))
    assert len(kept) == 1 and kept[0].startswith("warn:rule.target_failed x2: ")
    assert '"127.0.0.1:42003"' in kept[0]
    assert scan_json_lines(text, benign=iperf_udp_icmp(iperf_udp_targets(Backends(1, 2, 3)))) \
        == scan_json_lines(text)


def test_fixed_ports_for_the_iperf3_servers_lie_outside_the_ephemeral_range():
    import socket
    from portbench.procs import ephemeral_range, free_fixed_port
    lo, hi = ephemeral_range()
    ports = [free_fixed_port() for _ in range(20)]
    assert len(set(ports)) == 20                       # never handed out twice
    for p in ports:
        assert not lo <= p <= hi and p >= 1024
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", p))                   # still free for UDP (and TCP)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", p))


def test_queued_bytes_per_local_port():
    text = PROC_NET_UDP.replace("00000000:00000000 00:00000000 00000000  1000        0 4289",
                                "00000000:00000340 00:00000000 00000000  1000        0 4289")
    assert parse_udp_drops(text, {0xB22A}, "rx_queue") == {0xB22A: 0x340}
    assert parse_udp_drops(PROC_NET_UDP, {0xB22A}, "rx_queue") == {0xB22A: 0}
