"""UDP forwarding through the real standalone process (SPEC §2.3, §2.4).

Every check uses real datagrams on 127.0.0.1 and reads the counters through the
instance's [stats] socket. Idle reaping is not covered here: its minimum,
udp_flow_idle_secs = 30, is too long for an acceptance test.
"""

from __future__ import annotations

import resource
import selectors
import signal
import socket
import threading
import time

import pytest

from conftest import free_port, free_port_block, rule_stats, wait_until
from peers import TcpEchoServer, UdpEchoServer


@pytest.fixture(params=["batched", "per_datagram"])
def udp_path(request, monkeypatch):
    """recvmmsg/sendmmsg (relay/mmsg.py), or the per-datagram fallback forced by the environment."""
    if request.param == "per_datagram":
        monkeypatch.setenv("PORTUNUS_DISABLE_UDP_BATCH", "1")
    else:
        monkeypatch.delenv("PORTUNUS_DISABLE_UDP_BATCH", raising=False)
    return request.param


def udp_config(sock: str, name: str, listen: int, target: int, width: int = 1, extra: str = "") -> str:
    if width == 1:
        listen_line, target_line = f"listen_port = {listen}", f'target = "127.0.0.1:{target}"'
    else:
        listen_line = f'listen_ports = "{listen}-{listen + width - 1}"'
        target_line = f'target = "127.0.0.1:{target}-{target + width - 1}"'
    return f"""
[global]
log_level = "info"
shutdown_drain_secs = 1
[stats]
socket_path = "{sock}"
[[rule]]
name = "{name}"
protocol = "udp"
{listen_line}
{target_line}
{extra}
"""


def client(timeout: float = 2.0) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.settimeout(timeout)
    return c


def ask(c: socket.socket, port: int, payload: bytes, tries: int = 5, wait: float = 1.0) -> tuple[bytes, tuple]:
    """Send `payload` to the relay port until one reply arrives; returns (reply, its source)."""
    for _ in range(tries):
        c.sendto(payload, ("127.0.0.1", port))
        c.settimeout(wait)
        try:
            return c.recvfrom(65536)
        except socket.timeout:
            continue
    raise AssertionError(f"no reply through relay port {port} for {payload!r}")


def silent(c: socket.socket, wait: float = 0.3) -> bool:
    """True when nothing arrives on `c` within `wait` seconds."""
    c.settimeout(wait)
    try:
        c.recvfrom(65536)
        return False
    except socket.timeout:
        return True


def stat_is(sock: str, rule: str, **want):
    """Predicate for wait_until: the rule's stats once every `want` field equals its value."""
    def check():
        s = rule_stats(sock, rule)
        return s if all(s[k] == v for k, v in want.items()) else None
    return check


def test_4_port_range_echoes_on_every_port_from_the_same_offset(standalone, tmp_path):
    listen, target = free_port_block(4), free_port_block(4)
    echo = UdpEchoServer(range(target, target + 4))
    sock = str(tmp_path / "s.sock")
    standalone(udp_config(sock, "urange", listen, target, width=4))
    try:
        for off in range(4):
            c = client()
            reply, src = ask(c, listen + off, f"hello-{off}".encode())
            assert reply == f"{target + off}:hello-{off}".encode(), f"offset {off} reached the wrong target"
            assert src == ("127.0.0.1", listen + off), "reply must come back from the port the client sent to"
            c.close()
        stats = rule_stats(sock, "urange")
        assert stats["protocol"] == "udp" and stats["state"] == "active"
        assert stats["active_flows"] == 4
        assert stats["datagrams_in"] == stats["datagrams_out"] == echo.received == 4
        per_port = {row["listen_port"]: row for row in stats["per_port"]}
        assert sorted(per_port) == list(range(listen, listen + 4))
        for off in range(4):
            row = per_port[listen + off]
            assert row["datagrams_in"] == row["datagrams_out"] == 1
            assert row["bytes_in"] == len(f"hello-{off}")
            assert row["bytes_out"] == len(f"{target + off}:hello-{off}")
    finally:
        echo.close()


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs RLIMIT_NOFILE >= {need}, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_1000_sources_each_get_only_their_own_reply(standalone, tmp_path, udp_path):
    n = 1000
    _raise_nofile(n + 512)
    listen, target = free_port(), free_port()
    echo = UdpEchoServer([target])
    sock = str(tmp_path / "s.sock")
    standalone(udp_config(sock, "many", listen, target))
    clients = [client() for _ in range(n)]
    sel = selectors.DefaultSelector()
    try:
        for i, c in enumerate(clients):
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, i)
        replies: dict[int, list[bytes]] = {i: [] for i in range(n)}
        sends = [0] * n
        # batches keep the relay's listen socket buffer from overflowing; a lost datagram is re-sent
        for start in range(0, n, 50):
            batch = range(start, start + 50)
            for _ in range(5):
                missing = [i for i in batch if not replies[i]]
                if not missing:
                    break
                for i in missing:
                    clients[i].sendto(f"src-{i}-{'x' * (i % 50)}".encode(), ("127.0.0.1", listen))
                    sends[i] += 1
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and any(not replies[i] for i in missing):
                    for key, _ in sel.select(0.1):
                        i = key.data
                        while True:
                            try:
                                replies[i].append(key.fileobj.recv(65536))
                            except BlockingIOError:
                                break
        # late or duplicate deliveries would show up now
        time.sleep(0.3)
        for key, _ in sel.select(0):
            i = key.data
            while True:
                try:
                    replies[i].append(key.fileobj.recv(65536))
                except BlockingIOError:
                    break
        for i in range(n):
            want = f"{target}:src-{i}-{'x' * (i % 50)}".encode()
            assert replies[i], f"source {i} got no reply"
            assert all(r == want for r in replies[i]), f"source {i} got someone else's reply: {replies[i]!r}"
            assert len(replies[i]) <= sends[i], f"source {i} got more replies than it sent datagrams"
        got, sent = sum(len(r) for r in replies.values()), sum(sends)
        assert n <= got <= sent
        assert len(echo.sources) == n, "each source must have its own upstream socket"

        stats = rule_stats(sock, "many")
        assert stats["active_flows"] == n
        assert stats["flows_dropped_overflow"] == 0
        assert stats["send_dropped"] == 0
        # every datagram the relay forwarded reached the target, and every reply reached its source;
        # without loss (the usual case) all of these are exactly n
        assert stats["datagrams_in"] == echo.received == got, (stats, echo.received, got, sent)
        assert stats["datagrams_out"] == got
    finally:
        sel.close()
        for c in clients:
            c.close()
        echo.close()


def test_flow_cap_drops_new_flows_and_never_evicts_live_ones(standalone, tmp_path, udp_path):
    listen, target = free_port(), free_port()
    echo = UdpEchoServer([target])
    sock = str(tmp_path / "s.sock")
    standalone(udp_config(sock, "capped", listen, target, extra="udp_max_flows = 10"))
    first = [client() for _ in range(10)]
    extra = [client() for _ in range(10)]
    try:
        for i, c in enumerate(first):
            assert ask(c, listen, f"a{i}".encode())[0] == f"{target}:a{i}".encode()
        assert rule_stats(sock, "capped")["active_flows"] == 10

        for i, c in enumerate(extra):
            c.sendto(f"b{i}".encode(), ("127.0.0.1", listen))
        stats = wait_until(stat_is(sock, "capped", flows_dropped_overflow=10), what="10 overflow drops")
        assert stats["active_flows"] == 10
        for c in extra:
            assert silent(c, 0.05), "a source over the flow cap got a reply"
        assert echo.received == 10, "datagrams over the cap must not reach the target"

        # the live flows were not evicted to make room
        for i, c in enumerate(first):
            assert ask(c, listen, f"again{i}".encode(), tries=1, wait=3.0)[0] == f"{target}:again{i}".encode()
        stats = rule_stats(sock, "capped")
        assert stats["active_flows"] == 10
        assert stats["flows_dropped_overflow"] == 10
        assert stats["datagrams_out"] == 20
    finally:
        for c in first + extra:
            c.close()
        echo.close()


def test_flow_cap_is_per_rule_across_the_ports_of_a_range(standalone, tmp_path):
    listen, target = free_port_block(2), free_port_block(2)
    echo = UdpEchoServer([target, target + 1])
    sock = str(tmp_path / "s.sock")
    standalone(udp_config(sock, "capped-range", listen, target, width=2, extra="udp_max_flows = 10"))
    clients = {off: [client() for _ in range(5)] for off in (0, 1)}
    late = {off: client() for off in (0, 1)}
    try:
        for off, cs in clients.items():
            for i, c in enumerate(cs):
                assert ask(c, listen + off, f"p{off}-{i}".encode())[0] == f"{target + off}:p{off}-{i}".encode()
        stats = rule_stats(sock, "capped-range")
        assert stats["active_flows"] == 10
        assert stats["flows_dropped_overflow"] == 0
        # 5 + 5 flows filled the one per-rule cap: an 11th flow on either port is dropped
        for off, c in late.items():
            c.sendto(b"late", ("127.0.0.1", listen + off))
        stats = wait_until(stat_is(sock, "capped-range", flows_dropped_overflow=2), what="2 overflow drops")
        assert stats["active_flows"] == 10
        for c in late.values():
            assert silent(c), "a flow over the per-rule cap got a reply"
        for off, cs in clients.items():
            assert ask(cs[0], listen + off, b"still")[0] == f"{target + off}:still".encode()
    finally:
        for c in [c for cs in clients.values() for c in cs] + list(late.values()):
            c.close()
        echo.close()


def test_icmp_port_unreachable_evicts_the_flow_and_the_next_datagram_rebuilds_it(standalone, tmp_path, udp_path):
    listen, target = free_port(), free_port()  # nothing listens on target yet
    sock = str(tmp_path / "s.sock")
    p = standalone(udp_config(sock, "icmp", listen, target))
    c = client()
    echo = None
    try:
        c.sendto(b"anyone?", ("127.0.0.1", listen))
        ev = p.wait_event("rule.udp_flow_evicted_icmp", timeout=10)
        assert ev["rule"] == "icmp"
        assert ev["errno_name"] == "ECONNREFUSED"
        assert ev["source"] == f"127.0.0.1:{c.getsockname()[1]}"
        wait_until(stat_is(sock, "icmp", active_flows=0), what="the flow to be evicted")
        assert silent(c, 0.1)

        echo = UdpEchoServer([target])
        reply, _ = ask(c, listen, b"now?")
        assert reply == f"{target}:now?".encode()
        stats = rule_stats(sock, "icmp")
        assert stats["active_flows"] == 1
        assert stats["datagrams_out"] == 1
        assert len(p.events("rule.udp_flow_evicted_icmp")) == 1
        assert p.p.poll() is None
    finally:
        c.close()
        if echo is not None:
            echo.close()


def test_tcp_and_udp_rules_share_a_listen_port_number(standalone, tmp_path):
    listen = free_port()
    tcp_target, udp_target = free_port(), free_port()
    tcp_echo = TcpEchoServer([tcp_target], prefix_port=True)
    udp_echo = UdpEchoServer([udp_target])
    sock = str(tmp_path / "s.sock")
    p = standalone(f"""
[stats]
socket_path = "{sock}"
[[rule]]
name = "t"
protocol = "tcp"
listen_port = {listen}
target = "127.0.0.1:{tcp_target}"
[[rule]]
name = "u"
protocol = "udp"
listen_port = {listen}
target = "127.0.0.1:{udp_target}"
""")
    try:
        assert p.events("process.ready")[0]["rules"] == ["t", "u"]
        t = socket.create_connection(("127.0.0.1", listen), timeout=5)
        u = client()
        # both at once: the TCP connection stays open while UDP goes through
        t.sendall(b"over tcp")
        assert ask(u, listen, b"over udp")[0] == f"{udp_target}:over udp".encode()
        want = f"{tcp_target}:over tcp".encode()
        got = b""
        while len(got) < len(want):
            chunk = t.recv(100)
            assert chunk, "TCP connection closed early"
            got += chunk
        assert got == want
        assert ask(u, listen, b"again")[0] == f"{udp_target}:again".encode()
        t.close()
        u.close()
        assert rule_stats(sock, "u")["datagrams_out"] == 2
        assert rule_stats(sock, "t")["bytes_in"] == len(b"over tcp")
    finally:
        tcp_echo.close()
        udp_echo.close()


def test_a_target_that_never_reads_does_not_block_other_flows(standalone, tmp_path, udp_path):
    """Port a -> a sink that never reads (its buffer fills); port a+1 -> an echo. Same rule."""
    listen, target = free_port_block(2), free_port_block(2)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.bind(("127.0.0.1", target))
    echo = UdpEchoServer([target + 1])
    sock = str(tmp_path / "s.sock")
    standalone(udp_config(sock, "hol", listen, target, width=2))
    slow = client()
    fast = client()
    stop = threading.Event()
    blasted = {"n": 0}

    def blast():
        payload = b"s" * 1200
        while not stop.is_set():
            for _ in range(200):
                try:
                    slow.sendto(payload, ("127.0.0.1", listen))
                    blasted["n"] += 1
                except OSError:
                    pass
            time.sleep(0.001)
    try:
        for _ in range(3000):  # flood the slow flow first
            slow.sendto(b"s" * 1200, ("127.0.0.1", listen))
        t = threading.Thread(target=blast, daemon=True)
        t.start()
        # the fast flow keeps getting answers while the slow one is flooded
        start = time.monotonic()
        for i in range(20):
            assert ask(fast, listen + 1, f"q{i}".encode(), tries=5, wait=0.5)[0] == f"{target + 1}:q{i}".encode()
        elapsed = time.monotonic() - start
        stop.set()
        t.join(5)
        assert elapsed < 10, f"20 replies took {elapsed:.1f}s behind a stalled flow"
        stats = rule_stats(sock, "hol")
        per_port = {row["listen_port"]: row for row in stats["per_port"]}
        assert per_port[listen]["datagrams_in"] > 100, "the slow flow was not exercised"
        assert per_port[listen]["datagrams_out"] == 0
        assert per_port[listen + 1]["datagrams_out"] >= 20
        assert stats["active_flows"] == 2
    finally:
        stop.set()
        slow.close()
        fast.close()
        sink.close()
        echo.close()


def test_empty_and_near_max_datagrams_pass_intact(standalone, tmp_path, udp_path):
    listen, target = free_port(), free_port()
    echo = UdpEchoServer([target], prefix_port=False)
    sock = str(tmp_path / "s.sock")
    standalone(udp_config(sock, "sizes", listen, target))
    c = client()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        big = bytes(range(256)) * 234  # 59904 bytes
        for payload in (b"", big, b"z"):
            assert ask(c, listen, payload)[0] == payload
        stats = rule_stats(sock, "sizes")
        assert stats["datagrams_in"] == stats["datagrams_out"] == 3
        assert stats["bytes_in"] == stats["bytes_out"] == len(big) + 1
    finally:
        c.close()
        echo.close()


def test_sigterm_with_live_flows_exits_0_and_closes_the_port(standalone, tmp_path):
    listen, target = free_port(), free_port()
    echo = UdpEchoServer([target])
    sock = tmp_path / "s.sock"
    p = standalone(udp_config(str(sock), "bye", listen, target).replace("shutdown_drain_secs = 1",
                                                                         "shutdown_drain_secs = 30"))
    c = client()
    try:
        assert ask(c, listen, b"hi")[0] == f"{target}:hi".encode()
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
        assert time.monotonic() - t0 < 5, "UDP flows have nothing to drain; shutdown must not wait"
        p.wait_event("process.exit")
        assert not sock.exists(), "the stats socket is removed on exit"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", listen))  # the port is free again
        s.close()
    finally:
        c.close()
        echo.close()
