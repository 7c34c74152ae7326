"""Seed 004's "Traffic quotas" runbook through a real server and a real client: a 4 MiB quota cuts
a spliced transfer near 4 MiB, new connections are refused, the status says exhausted with
exhausted_at, the gauge is 1, PATCH clear resumes without a reconnect, and so does a PUT raise;
a quota of 0 blocks at once; UDP bytes are debited."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import free_port, wait_until
from cp import Server, enroll_client, write_server_toml
from peers import UdpEchoServer
from quota_env import add_grant, add_user, call, metric, scrape

MiB = 1 << 20
QUOTA = "/v1/users/alice/quotas/edge-tokyo"
GAUGE = 'portunus_traffic_quota_exhausted{user="alice",client="edge-tokyo"}'


class Sink:
    """Counts the bytes that reach the target."""

    def __init__(self):
        self.port = free_port()
        self.total = 0
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c):
        with c:
            while True:
                try:
                    data = c.recv(1 << 18)
                except OSError:
                    return
                if not data:
                    return
                self.total += len(data)

    def close(self):
        self.stop = True
        self.sock.close()


def blast(port: int, limit: int) -> tuple[int, OSError | None]:
    """Send up to ``limit`` bytes; returns (sent, the error that ended it, if any)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    chunk, sent = b"q" * 65536, 0
    try:
        while sent < limit:
            sent += c.send(chunk)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # the cut resets us here if the sends all fit in buffers
        return sent, None
    except OSError as exc:
        return sent, exc
    finally:
        c.close()


def refused(port: int) -> bool:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:
        return True
    with c:
        try:
            c.sendall(b"x")
            return c.recv(1) == b"" and False
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def accepted(port: int, sink: Sink) -> bool:
    before = sink.total
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"r" * 1000)
        wait_until(lambda: sink.total >= before + 1000, timeout=10, what="bytes forwarded again")
    return True


@pytest.fixture
def world(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    alice = add_user(server, "alice")
    agent, _ = enroll_client(server, procs, tmp_path, "edge-tokyo")
    add_grant(server, "alice", "edge-tokyo")
    return server, alice, agent


def push(server, alice, body) -> dict:
    status, rule = call(server, "POST", "/v1/rules", {"client": "edge-tokyo", **body}, token=alice)
    assert status == 201, rule
    return rule


def test_the_runbook_cut_refuse_status_gauge_clear_and_raise(world):
    server, alice, agent = world
    sink = Sink()
    listen = free_port()
    try:
        rule = push(server, alice, {"listen_port": listen, "target": f"127.0.0.1:{sink.port}"})
        assert call(server, "PUT", QUOTA, {"monthly_bytes": 4 * MiB})[0] == 201
        agent.wait_event("traffic_quota.applied_set", pred=lambda e: e.get("user") == "alice")

        sent, error = blast(listen, 16 * MiB)
        assert isinstance(error, (ConnectionResetError, BrokenPipeError)), (sent, error)
        time.sleep(0.5)
        assert 3 * MiB <= sink.total <= 4 * MiB + 64 * 1024, sink.total  # within one chunk of the budget
        agent.wait_event("proxy.splice_selected", pred=lambda e: e.get("rule") == rule["rule_id"])
        agent.wait_event("traffic_quota.exhausted_reported", pred=lambda e: e.get("user") == "alice")
        assert refused(listen)

        status = wait_until(lambda: (lambda v: v if v["exhausted"] else None)(
            call(server, "GET", QUOTA + "/status", token=alice)[1]), what="exhausted on the server")
        assert status["exhausted"] is True and status["exhausted_at"] is not None
        assert metric(scrape(server), GAUGE) == 1

        connected = len(agent.events("control.connected"))
        applied = len(agent.events("traffic_quota.applied_set"))
        assert call(server, "PATCH", QUOTA, {"clear_period_usage": True})[0] == 200
        wait_until(lambda: len(agent.events("traffic_quota.applied_set")) > applied, what="the fresh state")
        wait_until(lambda: not refused(listen), timeout=10, what="accepting again after the clear")
        assert accepted(listen, sink)
        assert metric(scrape(server), GAUGE) == 0

        # exhaust again, then a PUT raise resumes as well
        before = sink.total
        blast(listen, 16 * MiB)
        wait_until(lambda: call(server, "GET", QUOTA + "/status", token=alice)[1]["exhausted"], timeout=15,
                   what="exhausted again")
        assert sink.total - before <= 4 * MiB + 64 * 1024
        assert refused(listen)
        assert call(server, "PUT", QUOTA, {"monthly_bytes": 64 * MiB})[0] == 200
        wait_until(lambda: not refused(listen), timeout=10, what="accepting again after the raise")
        assert accepted(listen, sink)
        assert len(agent.events("control.connected")) == connected  # never a reconnect
    finally:
        sink.close()


def test_a_quota_of_0_blocks_at_once_and_udp_is_debited(world):
    server, alice, agent = world
    sink = Sink()
    target = free_port()
    echo = UdpEchoServer([target])
    tcp_port, udp_port = free_port(), free_port()
    try:
        push(server, alice, {"listen_port": tcp_port, "target": f"127.0.0.1:{sink.port}"})
        push(server, alice, {"protocol": "udp", "listen_port": udp_port, "target": f"127.0.0.1:{target}"})
        assert call(server, "PUT", QUOTA, {"monthly_bytes": 0})[0] == 201
        agent.wait_event("traffic_quota.applied_set", pred=lambda e: e.get("exhausted") is True)
        assert refused(tcp_port)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(1)
        s.sendto(b"u" * 100, ("127.0.0.1", udp_port))
        with pytest.raises(socket.timeout):
            s.recv(2048)  # dropped: the pair is exhausted
        # a budget for a few datagrams: they pass and the server counts them
        assert call(server, "PUT", QUOTA, {"monthly_bytes": 10_000})[0] == 200
        agent.wait_event("traffic_quota.applied_set", pred=lambda e: e.get("exhausted") is False)
        s.sendto(b"u" * 1000, ("127.0.0.1", udp_port))
        assert len(s.recv(2048)) >= 1000
        wait_until(lambda: call(server, "GET", QUOTA + "/status", token=alice)[1]["current_period_bytes_used"] >= 2000,
                   timeout=15, what="UDP bytes accounted")
        s.close()
    finally:
        echo.close()
        sink.close()
