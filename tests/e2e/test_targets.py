"""Targets end to end (SPEC §2.5, §2.6, §2.7, §3.1): multi-target failover and recovery, per-target
stats, PROXY protocol headers, DNS-name targets (single-flight, stale-while-error grace, failure
accounting), the capability gate, list-rules CAPS, the splice fast path on failover/DNS rules, and UDP
flows with two targets.

Real server, real client, real standalone processes and real sockets on 127.0.0.1. The PROXY header
is parsed here by a small parser of the test's own (struct / str.split), never by portunus's, so the
check is independent of the encoder under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.request

import pytest

from conftest import free_port, rule_stats, wait_until
from cp import Server, enroll_client, wait_connected, write_server_toml
from dnsserver import DnsServer
from peers import TcpEchoServer, UdpEchoServer

A = 1  # DNS qtype A


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


# ------------------------------------------------------------------ helpers

def push(server: Server, *args) -> str:
    res = server.cli("push-rule", *args)
    assert res.returncode == 0, f"push-rule {' '.join(args)} exited {res.returncode}:\n{res.stderr}"
    return res.stdout.strip()


def stats(server: Server, rule_id: str, *flags) -> dict:
    res = server.cli("rule-stats", rule_id, *flags, "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wait_stats(server: Server, rule_id: str, pred, timeout: float = 15, what: str = "rule stats", flags=()):
    """Poll rule-stats (server CLI) until pred(stats) holds; returns those stats.

    Until the first stats report arrives per_target is empty; pred only sees reported stats.
    """
    def check():
        s = stats(server, rule_id, *flags)
        if "--per-target" in flags and not s.get("per_target"):
            return None
        return s if pred(s) else None
    return wait_until(check, timeout=timeout, interval=0.25, what=what)


def metrics(server: Server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()


def metric_rows(text: str, family: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(family + "{")]


def metric_value(text: str, family: str, rule_id: str) -> float | None:
    for line in metric_rows(text, family):
        if f'rule="{rule_id}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def roundtrip(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    """Send payload, half-close, read until EOF; returns what came back.

    A reset after some bytes ends the read like EOF does (a relay that drops a connection it could
    not route may reset it while our bytes are unread); callers judge by what came back.
    """
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = []

    def reader():
        try:
            while True:
                b = c.recv(1 << 20)
                if not b:
                    return
                got.append(b)
        except OSError:
            return
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    t.join(timeout)
    assert not t.is_alive(), "no EOF came back through the relay"
    c.close()
    return b"".join(got)


def echo_prefix(port: int) -> bytes:
    return f"{port}:".encode()


def which_target(port: int, payload: bytes, timeout: float = 10) -> int | None:
    """One connection through the relay; the port of the echo backend that answered, or None."""
    got = roundtrip(port, payload, timeout=timeout)
    m = re.match(rb"(\d+):", got)
    if not m:
        return None
    assert got[m.end():] == payload, "payload came back altered"
    return int(m.group(1))


def try_once(port: int, payload: bytes = b"ping", timeout: float = 5) -> int | None:
    """Like which_target, but a reset or a refused connection counts as 'did not get through'."""
    try:
        return which_target(port, payload, timeout=timeout)
    except OSError:
        return None


class RecordingBackend:
    """Accepts TCP connections, records every byte until EOF, answers b"ok" and closes."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._cond = threading.Condition()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(20)
        chunks = []
        try:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                chunks.append(b)
            c.sendall(b"ok")
        except OSError:
            pass
        finally:
            c.close()
        with self._cond:
            self.received.append(b"".join(chunks))
            self._cond.notify_all()

    def wait_received(self, n: int, timeout: float = 10) -> list[bytes]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"backend received {len(self.received)} connections, wanted {n}"
                self._cond.wait(left)
            return list(self.received)

    def close(self) -> None:
        self._stop = True
        self._t.join(5)
        self.sock.close()


def send_through(port: int, payload: bytes) -> tuple[tuple[str, int], bytes]:
    """Connect to the relay, send payload, half-close; returns (our own address, the reply)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=15)
    me = c.getsockname()
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        b = c.recv(65536)
        if not b:
            break
        reply += b
    c.close()
    return me, reply


V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def parse_v2_ipv4(data: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    """(src, dst, rest) of a PROXY v2 PROXY/TCP4 header; asserts on anything else."""
    assert data[:12] == V2_SIG, f"no v2 signature: {data[:16]!r}"
    ver_cmd, fam, length = struct.unpack(">BBH", data[12:16])
    assert ver_cmd == 0x21, f"version/command byte {ver_cmd:#x}, want 0x21 (v2, PROXY)"
    assert fam == 0x11, f"family/transport byte {fam:#x}, want 0x11 (AF_INET, STREAM)"
    assert length >= 12, length
    src_ip, dst_ip, sport, dport = struct.unpack(">4s4sHH", data[16:28])
    return ((socket.inet_ntoa(src_ip), sport), (socket.inet_ntoa(dst_ip), dport), data[16 + length:])


def parse_v1(data: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    line, sep, rest = data.partition(b"\r\n")
    assert sep, f"no CRLF-terminated v1 line in {data[:120]!r}"
    assert len(line) + 2 <= 107, "a v1 line is at most 107 bytes"
    parts = line.decode("ascii").split(" ")
    assert len(parts) == 6 and parts[0] == "PROXY" and parts[1] == "TCP4", line
    return (parts[2], int(parts[4])), (parts[3], int(parts[5])), rest


# ------------------------------------------------------------------ 1. failover, per-target stats, recovery

def test_failover_per_target_stats_metrics_and_passive_trial_recovery(server, procs, tmp_path):
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, dead, alive = free_port(), free_port(), free_port()
    single_listen = free_port()
    echo = TcpEchoServer([alive], prefix_port=True)
    revived = None
    try:
        rule = push(server, "edge-01", str(listen), "--target", f"127.0.0.1:{dead}@1",
                    "--target", f"127.0.0.1:{alive}@2")
        single = push(server, "edge-01", str(single_listen), f"127.0.0.1:{alive}")

        payloads = [f"hello-{i}".encode() * (i + 1) for i in range(5)]
        for p in payloads:
            assert which_target(listen, p) == alive  # every connection lands on the priority-2 target
        assert which_target(single_listen, b"single") == alive
        failed_ev = agent.wait_event("rule.target_failed", pred=lambda e: e.get("rule") == rule)
        failed_at = time.monotonic()
        assert failed_ev["index"] == 0

        s = wait_stats(server, rule, lambda s: s["per_target"][1]["connections"] == len(payloads),
                       flags=("--per-target",), what="per-target stats report")
        primary, secondary = s["per_target"]
        assert (primary["index"], primary["port"], primary["priority"]) == (0, dead, 1)
        assert (secondary["index"], secondary["port"], secondary["priority"]) == (1, alive, 2)
        assert primary["health"] == "failed" and primary["consecutive_failures"] == 3
        assert primary["connections"] == 0 and primary["bytes_in"] == primary["bytes_out"] == 0
        assert primary["last_failure_at"] and not primary["last_success_at"]
        assert secondary["health"] == "healthy" and secondary["consecutive_failures"] == 0
        assert secondary["bytes_in"] == sum(map(len, payloads))
        assert secondary["bytes_out"] == sum(len(p) + len(echo_prefix(alive)) for p in payloads)
        assert s["target_failovers_total"] == 1
        assert s["bytes_in"] == secondary["bytes_in"]

        text = metrics(server)
        rows = metric_rows(text, "portunus_rule_target_failovers_total")
        assert len(rows) == 1 and f'rule="{rule}"' in rows[0], rows  # the multi-target rule only
        assert metric_value(text, "portunus_rule_target_failovers_total", rule) == 1
        assert metric_value(text, "portunus_rule_bytes_in_total", single) is not None
        # per-target detail is reported, never exported
        families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        assert {f for f in families if "target" in f} == {"portunus_rule_target_failovers_total"}
        labels = [line[line.index("{"):line.index("}") + 1] for line in text.splitlines()
                  if line.startswith("portunus_") and "{" in line]
        assert not [lb for lb in labels if str(dead) in lb or str(alive) in lb]
        # label *names* (a value such as reason="stats_bad_per_target" names a rejection, not a target)
        label_names = {name for lb in labels for name in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', lb)}
        assert not [n for n in label_names if "target" in n or "index" in n or n in ("host", "port")]
        assert not [f for f in families if "per_target" in f]
        assert len(metric_rows(text, "portunus_rule_bytes_in_total")) == 2

        # the primary comes back: trial connections (no active probes on this rule) win it back
        revived = TcpEchoServer([dead], prefix_port=True)

        def back_on_primary():
            if try_once(listen, b"again") != dead:
                return False
            per_target = stats(server, rule, "--per-target")["per_target"]
            return per_target[0]["health"] == "healthy"
        wait_until(back_on_primary, timeout=20, interval=0.5, what="primary healthy again via trial connections")
        recovered_after = time.monotonic() - failed_at
        assert recovered_after < 16, f"passive recovery took {recovered_after:.1f} s"
        agent.wait_event("rule.target_healthy", pred=lambda e: e.get("rule") == rule and e.get("index") == 0)
        for _ in range(3):
            assert which_target(listen, b"after") == dead  # new connections go to the primary again
        s = wait_stats(server, rule, lambda s: s["target_failovers_total"] == 2, what="failover count 2")
        wait_until(lambda: metric_value(metrics(server), "portunus_rule_target_failovers_total", rule) == 2,
                   timeout=10, interval=0.3, what="failovers in /metrics")
    finally:
        echo.close()
        if revived is not None:
            revived.close()


def test_active_probes_mark_and_recover_the_primary_fast(server, procs, tmp_path):
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, dead, alive = free_port(), free_port(), free_port()
    echo = TcpEchoServer([alive], prefix_port=True)
    revived = None
    try:
        rule = push(server, "edge-01", str(listen), "--target", f"127.0.0.1:{dead}@1",
                    "--target", f"127.0.0.1:{alive}@2", "--health-check-interval-secs", "1")
        listing = json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)
        assert listing[0]["health_check_interval_secs"] == 1
        # probes alone find the dead primary: no end-user connection has to pay for it
        agent.wait_event("rule.target_failed", timeout=10, pred=lambda e: e.get("rule") == rule)
        assert which_target(listen, b"x") == alive
        revived = TcpEchoServer([dead], prefix_port=True)
        t0 = time.monotonic()
        agent.wait_event("rule.target_healthy", timeout=10,
                         pred=lambda e: e.get("rule") == rule and e.get("index") == 0)
        assert time.monotonic() - t0 < 5, "active probes every 1 s should recover the primary within ~2-3 s"
        assert which_target(listen, b"y") == dead
        s = wait_stats(server, rule, lambda s: s["target_failovers_total"] == 2 and
                       s["per_target"][0]["health"] == "healthy", flags=("--per-target",),
                       what="recovered primary in stats")
        assert s["per_target"][0]["connections"] >= 1
    finally:
        echo.close()
        if revived is not None:
            revived.close()


# ------------------------------------------------------------------ 2. PROXY protocol

def test_proxy_protocol_v2_and_v1_headers_through_server_and_client(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    backend = RecordingBackend()
    try:
        l2, l1 = free_port(), free_port()
        r2 = push(server, "edge-01", str(l2), "--targets-json",
                  json.dumps([{"host": "127.0.0.1", "port": backend.port, "proxy_protocol": "v2"}]))
        r1 = push(server, "edge-01", str(l1), "--targets-json",
                  json.dumps([{"host": "127.0.0.1", "port": backend.port, "proxy_protocol": "v1"}]))
        rules = {r["rule_id"]: r for r in json.loads(server.cli("list-rules", "--format", "json").stdout)}
        assert rules[r2]["targets"][0]["proxy_protocol"] == "v2"
        assert rules[r1]["targets"][0]["proxy_protocol"] == "v1"

        payload = os.urandom(300_000) + b"PROXY TCP4 looks-like-a-header\r\n"
        me2, reply = send_through(l2, payload)
        assert reply == b"ok"
        data = backend.wait_received(1)[0]
        src, dst, rest = parse_v2_ipv4(data)
        assert src == me2, f"v2 source {src} is not the client's own address {me2}"
        assert dst == ("127.0.0.1", l2)
        assert rest == payload

        me1, reply = send_through(l1, payload)
        assert reply == b"ok"
        data = backend.wait_received(2)[1]
        src, dst, rest = parse_v1(data)
        assert src == me1 and dst == ("127.0.0.1", l1)
        assert rest == payload

        # PROXY header bytes are not payload: bytes_in counts only what the end user sent
        wait_stats(server, r2, lambda s: s["bytes_in"] == len(payload) and s["bytes_out"] == 2,
                   what="v2 rule byte counters")
    finally:
        backend.close()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "userspace"])
def test_standalone_proxy_protocol_v1_target(standalone, tmp_path, splice):
    backend = RecordingBackend()
    listen = free_port()
    sock = str(tmp_path / "stats.sock")
    env = {} if splice else {"PORTUNUS_DISABLE_SPLICE": "1"}
    try:
        standalone(f"""
[global]
shutdown_drain_secs = 1
[stats]
socket_path = "{sock}"
[[rule]]
name = "pp1"
listen_port = {listen}
targets = [{{host = "127.0.0.1", port = {backend.port}, proxy_protocol = "v1"}}]
""", env=env)
        payloads = [b"hello\r\n", os.urandom(1 << 20)]
        for i, payload in enumerate(payloads):
            me, reply = send_through(listen, payload)
            assert reply == b"ok"
            src, dst, rest = parse_v1(backend.wait_received(i + 1)[i])
            assert src == me and dst == ("127.0.0.1", listen)
            assert hashlib.sha256(rest).digest() == hashlib.sha256(payload).digest()
        wait_until(lambda: rule_stats(sock, "pp1")["bytes_in"] == sum(map(len, payloads)),
                   what="bytes_in without the header")
    finally:
        backend.close()


# ------------------------------------------------------------------ 3. DNS-name targets

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dns_name_target_single_flight_stale_grace_failure_and_recovery(server, procs, tmp_path):
    dns = DnsServer()
    dns.set("backend.test", a=["127.0.0.1"], ttl=5)
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01",
                             env={"PORTUNUS_DNS_SERVERS": f"127.0.0.1:{dns.port}"})
    wait_connected(server, "edge-01")
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target], prefix_port=True)
    try:
        rule = push(server, "edge-01", str(listen), f"backend.test:{target}")
        assert dns.count("backend.test") == 0  # lazy: nothing resolved before the first connection
        # the answer comes 1 s late so all 100 first connections wait on the one lookup in flight
        dns.delay("backend.test", 1.0)

        # 100 simultaneous first connections -> one A lookup, all 100 get through
        n = 100
        barrier = threading.Barrier(n)
        results: list = [None] * n

        def one(i):
            barrier.wait(10)
            try:
                results[i] = which_target(listen, f"c{i}".encode(), timeout=20)
            except OSError as exc:
                results[i] = exc
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        t_done = time.monotonic()
        assert results == [target] * n, [r for r in results if r != target][:5]
        assert dns.count("backend.test", qtype=A) == 1, dns.queries
        assert t_done - t_start >= 0.9  # they really waited on that lookup
        dns.delay("backend.test", 0)

        # the responder fails: the stale answer keeps serving through the grace window
        dns.fail("backend.test")
        grace_end_earliest = t_start + 5 + 30  # lookup at/after t_start, TTL 5 s, grace 30 s
        grace_end_latest = t_done + 5 + 30
        first_failure = None
        while time.monotonic() < grace_end_latest + 8:
            now = time.monotonic()
            got = try_once(listen, b"during")
            if got is None:
                first_failure = now
                break
            assert got == target
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        assert first_failure is not None, "connections still went through long after the grace window"
        assert first_failure >= grace_end_earliest - 1.0, \
            f"a connection failed {grace_end_earliest - first_failure:.1f} s before the 30 s grace ended"
        assert first_failure <= grace_end_latest + 4.0
        assert agent.events("dns.serving_stale"), "the stale answer was served without a dns.serving_stale log"
        assert dns.count("backend.test", qtype=A) > 1  # refreshes were attempted while failing
        assert try_once(listen) is None  # and stays failed after grace

        ev = agent.wait_event("rule.dns_failed", timeout=5, pred=lambda e: e.get("rule") == rule)
        assert ev["host"] == "backend.test" and ev["reason"]
        failures = wait_stats(server, rule, lambda s: s["dns_failures"] >= 1, what="dns_failures")["dns_failures"]
        wait_until(lambda: (metric_value(metrics(server), "portunus_rule_dns_failures_total", rule) or 0) >= 1,
                   timeout=10, interval=0.3, what="portunus_rule_dns_failures_total")
        # a resolution failure never fails the rule
        listing = json.loads(server.cli("list-rules", "--format", "json").stdout)
        assert [r["state"] for r in listing if r["rule_id"] == rule] == ["active"]

        # the name answers again: connections recover (failed names are retried at most every 3 s)
        dns.set("backend.test", a=["127.0.0.1"], ttl=5)
        wait_until(lambda: try_once(listen, b"back") == target, timeout=10, interval=0.3,
                   what="recovery after the DNS server answers again")
        assert stats(server, rule)["dns_failures"] >= failures
    finally:
        echo.close()
        dns.close()


# ------------------------------------------------------------------ 4. capability gate

def test_capability_gate_refuses_multi_target_and_proxy_protocol(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "old-edge", env={"PORTUNUS_CLIENT_CAPABILITIES": "udp,port_range"})
    c = wait_connected(server, "old-edge")
    assert sorted(c["capabilities"]) == ["port_range", "udp"]

    res = server.cli("push-rule", "old-edge", str(free_port()), "--target", "127.0.0.1:9001@1",
                     "--target", "127.0.0.1:9002@2")
    assert res.returncode == 3, res.stderr
    assert "error: multi_target_unsupported_by_client:" in res.stderr

    res = server.cli("push-rule", "old-edge", str(free_port()), "--targets-json",
                     json.dumps([{"host": "127.0.0.1", "port": 9001, "proxy_protocol": "v1"}]))
    assert res.returncode == 3, res.stderr
    assert "error: proxy_protocol_unsupported_by_client:" in res.stderr

    res = server.cli("push-rule", "old-edge", str(free_port()), "--targets-json",
                     json.dumps([{"host": "127.0.0.1", "port": 9001, "priority": 1, "proxy_protocol": "v2"},
                                 {"host": "127.0.0.1", "port": 9002, "priority": 2}]))
    assert res.returncode == 3, res.stderr
    assert "_unsupported_by_client:" in res.stderr
    assert json.loads(server.cli("list-rules", "--format", "json").stdout) == []  # nothing stored

    # the same client still takes what it can run
    push(server, "old-edge", str(free_port()), "127.0.0.1:9001")
    assert len(json.loads(server.cli("list-rules", "--format", "json").stdout)) == 1


# ------------------------------------------------------------------ 5. list-rules CAPS and targets

def test_list_rules_caps_column_and_json_targets(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    multi = push(server, "edge-01", str(free_port()), "--target", "127.0.0.1:9001@2",
                 "--target", "127.0.0.1:9002@1", "--target", "127.0.0.1:9003")
    proxy = push(server, "edge-01", str(free_port()), "--targets-json",
                 json.dumps([{"host": "127.0.0.1", "port": 9004, "proxy_protocol": "v2"}]))
    both = push(server, "edge-01", str(free_port()), "--targets-json",
                json.dumps([{"host": "127.0.0.1", "port": 9005, "priority": 1, "proxy_protocol": "v1"},
                            {"host": "127.0.0.1", "port": 9006, "priority": 2}]))
    plain = push(server, "edge-01", str(free_port()), "127.0.0.1:9007")

    text = server.cli("list-rules", check=True).stdout.splitlines()
    header = text[0].split()
    assert "CAPS" in header
    caps_col = header.index("CAPS")
    caps = {}
    for line in text[1:]:
        cols = line.split()
        caps[cols[0]] = set(cols[caps_col].split(","))
    assert "multi" in caps[multi] and "proxy" not in caps[multi]
    assert "proxy" in caps[proxy] and "multi" not in caps[proxy]
    assert {"multi", "proxy"} <= caps[both]
    assert caps[plain] == {"-"}

    rules = {r["rule_id"]: r for r in json.loads(server.cli("list-rules", "--format", "json").stdout)}
    assert [(t["host"], t["port"], t["priority"]) for t in rules[multi]["targets"]] == \
        [("127.0.0.1", 9001, 2), ("127.0.0.1", 9002, 1), ("127.0.0.1", 9003, 3)]
    assert all(t["proxy_protocol"] is None for t in rules[multi]["targets"])
    assert [(t["port"], t["priority"], t["proxy_protocol"]) for t in rules[both]["targets"]] == \
        [(9005, 1, "v1"), (9006, 2, None)]
    assert rules[proxy]["targets"][0]["proxy_protocol"] == "v2"


# ------------------------------------------------------------------ 6. splice kept on failover and DNS rules

def test_splice_fast_path_on_failover_and_dns_name_rules(server, procs, tmp_path):
    dns = DnsServer()
    dns.set("bulk.test", a=["127.0.0.1"], ttl=60)
    env = {"PORTUNUS_DNS_SERVERS": f"127.0.0.1:{dns.port}"}
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01", env=env)
    wait_connected(server, "edge-01")
    assert os.environ.get("PORTUNUS_DISABLE_SPLICE") != "1"
    l_fail, l_dns, dead, alive = free_port(), free_port(), free_port(), free_port()
    echo = TcpEchoServer([alive], prefix_port=True)
    try:
        r_fail = push(server, "edge-01", str(l_fail), "--target", f"127.0.0.1:{dead}@1",
                      "--target", f"127.0.0.1:{alive}@2")
        r_dns = push(server, "edge-01", str(l_dns), f"bulk.test:{alive}")
        payload = os.urandom(4 << 20)
        want = hashlib.sha256(payload).hexdigest()
        prefix = echo_prefix(alive)
        for port in (l_fail, l_fail, l_dns):  # the first l_fail connection walks past the dead primary
            got = roundtrip(port, payload)
            assert got.startswith(prefix)
            assert hashlib.sha256(got[len(prefix):]).hexdigest() == want
        for rule in (r_fail, r_dns):
            agent.wait_event("proxy.splice_selected", pred=lambda e, r=rule: e.get("rule") == r)
        assert not agent.events("proxy.splice_unsupported_fallback")
        assert dns.count("bulk.test", qtype=A) == 1
        wait_stats(server, r_fail, lambda s: s["bytes_in"] == 2 * len(payload), what="failover rule bytes")
    finally:
        echo.close()
        dns.close()


# ------------------------------------------------------------------ 7. UDP with two targets

def test_udp_two_targets_flow_sticks_then_icmp_failures_move_new_flows(server, procs, tmp_path):
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, p1, p2 = free_port(), free_port(), free_port()
    primary = UdpEchoServer([p1])
    secondary = UdpEchoServer([p2])
    socks = []

    def client():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        socks.append(s)
        return s

    def ask(s, data: bytes) -> bytes | None:
        s.sendto(data, ("127.0.0.1", listen))
        try:
            return s.recvfrom(65536)[0]
        except socket.timeout:
            return None
    try:
        rule = push(server, "edge-01", str(listen), "--protocol", "udp",
                    "--target", f"127.0.0.1:{p1}@1", "--target", f"127.0.0.1:{p2}@2")
        a = client()
        for i in range(5):  # one flow, one target: the priority-1 one, every time
            assert ask(a, f"a{i}".encode()) == f"{p1}:a{i}".encode()
        assert primary.received == 5 and secondary.received == 0

        primary.close()  # the primary's port is now closed: ICMP port unreachable

        def primary_marked_failed() -> bool:
            # each datagram to the dead primary: ICMP error, its flow evicted, one failure counted
            a.sendto(b"lost", ("127.0.0.1", listen))
            return any(e.get("rule") == rule and e.get("index") == 0 for e in agent.events("rule.target_failed"))
        wait_until(primary_marked_failed, timeout=10, interval=0.3, what="ICMP evictions to fail the primary")
        evictions = [e for e in agent.events("rule.udp_flow_evicted_icmp") if e.get("rule") == rule]
        assert len(evictions) == 1, "ICMP evictions are rate-limited: the first is logged, the rest counted"
        a.settimeout(0.5)
        try:
            while True:  # replies of the secondary to 'lost' datagrams sent after the failover
                a.recvfrom(65536)
        except socket.timeout:
            a.settimeout(3)

        assert ask(a, b"next") == f"{p2}:next".encode()  # the rebuilt flow goes to the secondary
        b = client()
        for i in range(3):
            assert ask(b, f"b{i}".encode()) == f"{p2}:b{i}".encode()

        # a live flow keeps its target even when the primary answers again
        primary = UdpEchoServer([p1])
        for i in range(3):
            assert ask(b, f"k{i}".encode()) == f"{p2}:k{i}".encode()
        assert primary.received == 0

        s = wait_stats(server, rule, lambda s: s["per_target"][1]["connections"] >= 2, flags=("--per-target",),
                       what="UDP per-target stats")
        assert s["per_target"][0]["health"] == "failed"
        assert s["per_target"][1]["health"] == "healthy"
        assert s["target_failovers_total"] == 1
    finally:
        primary.close()
        secondary.close()
        for s in socks:
            s.close()
