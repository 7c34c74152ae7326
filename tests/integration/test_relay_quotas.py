"""Traffic quotas on real sockets in-process (SPEC §2.10): the splice path cut near the budget,
new connections refused, a fresh state resumes without a reconnect, a 0 quota, UDP debits, and
the agent's side of the messages (applied_set, the exhaustion report, mark_reported)."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import free_port, wait_until
from harness import Blaster, CountingSink, LogCapture, LoopThread, refused, tcp_rule
from peers import TcpEchoServer, UdpEchoServer
from portunus.control import agent as agent_mod
from portunus.control import messages as m
from portunus.model import Rule
from portunus.relay.splice import splice_available

MiB = 1 << 20
HOUR = 3600


@pytest.fixture
def lt():
    x = LoopThread()
    yield x
    x.close()


@pytest.fixture
def sink():
    port = free_port()
    s = CountingSink(port)
    s.port = port
    yield s
    s.close()


def quota_set(user: str, remaining: int, monthly: int | None = None, exhausted: bool = False) -> dict:
    now = int(time.time())
    return m.traffic_quota_update(user, "edge-01", "set", {
        "monthly_bytes": remaining if monthly is None else monthly, "budget_remaining_bytes": remaining,
        "period_started_at": now - HOUR, "period_ends_at": now + 30 * 24 * HOUR, "exhausted": exhausted})


def apply(lt: LoopThread, msg: dict):
    return lt.call(lt.enforcer.quotas.apply_update, msg)


def test_a_4mib_budget_cuts_a_spliced_transfer_near_4mib_then_refuses_then_resumes(lt, sink, monkeypatch):
    monkeypatch.delenv("PORTUNUS_DISABLE_SPLICE", raising=False)
    logs = LogCapture(monkeypatch)
    listen = free_port()
    lt.call(lt.runtime.activate, tcp_rule("q", listen, sink.port, owner="alice"))
    fired = []
    lt.call(lt.enforcer.exhaustion_hooks.append, fired.append)
    apply(lt, quota_set("alice", 4 * MiB))
    c = socket.create_connection(("127.0.0.1", listen), timeout=5)
    b = Blaster(c, limit=12 * MiB)
    wait_until(lambda: b.error is not None or not b.t.is_alive(), timeout=20, what="the transfer cut")
    b.stop()
    assert isinstance(b.error, (ConnectionResetError, BrokenPipeError)), b.error
    time.sleep(0.3)  # the sink drains what the relay delivered
    assert 3 * MiB <= sink.total <= 4 * MiB, sink.total  # never over: debited at read time
    handle = lt.call(lt.enforcer.quotas.handle, "alice")
    assert handle.exhausted and handle.debited_total <= 4 * MiB
    assert [h.user_id for h in fired] == ["alice"]
    if splice_available():
        assert logs.events("proxy.splice_selected", rule="q")  # quota-bound rules keep the fast path
    # new connections refused with RST until a fresh state arrives
    assert refused(listen)
    assert lt.snapshot("q")["quota_refused"] >= 1
    apply(lt, quota_set("alice", 1 * MiB))  # before the report carried the 4 MiB: still nothing left
    assert refused(listen)
    lt.call(lt.enforcer.quotas.mark_reported)  # the agent sent its stats report
    apply(lt, quota_set("alice", 1 * MiB))  # e.g. PATCH clear or PUT raise: no reconnect needed
    before = sink.total
    with socket.create_connection(("127.0.0.1", listen), timeout=5) as c2:
        c2.sendall(b"r" * 1000)
    wait_until(lambda: sink.total >= before + 1000, what="forwarding resumed")
    c.close()


def test_a_quota_of_0_blocks_at_once_and_remove_unmeters(lt):
    target, listen = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        lt.call(lt.runtime.activate, tcp_rule("zero", listen, target, owner="dave"))
        apply(lt, quota_set("dave", 0, exhausted=True))
        assert refused(listen)
        apply(lt, m.traffic_quota_update("dave", "edge-01", "remove"))
        assert not refused(listen)
    finally:
        echo.close()


def test_the_userspace_path_debits_too_when_the_rule_is_also_capped(lt, sink):
    listen = free_port()
    lt.call(lt.runtime.activate, tcp_rule("both", listen, sink.port, owner="erin",
                                          rate_limit={"bandwidth_in_bps": 8 * MiB}))
    apply(lt, quota_set("erin", 2 * MiB))
    assert lt.call(lambda: lt.runtime.ctx.enforcer.splice_allowed(lt.runtime.rules["both"].rule)) is False
    c = socket.create_connection(("127.0.0.1", listen), timeout=5)
    b = Blaster(c, limit=6 * MiB)
    wait_until(lambda: b.error is not None or not b.t.is_alive(), timeout=20, what="the transfer cut")
    b.stop()
    time.sleep(0.3)
    assert 1 * MiB <= sink.total <= 2 * MiB
    c.close()


def test_udp_debits_whole_datagrams_and_exhaustion_drops_the_flow(lt):
    target, listen = free_port(), free_port()
    echo = UdpEchoServer([target])
    try:
        rule = Rule.from_dict({"rule_id": "uq", "protocol": "udp", "listen_port": listen,
                               "target": f"127.0.0.1:{target}", "owner": "fred"})
        lt.call(lt.runtime.activate, rule)
        apply(lt, quota_set("fred", 1000))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"u" * 300, ("127.0.0.1", listen))
        back = len(s.recv(2048))  # the echo peer prefixes its port: a few bytes more than 300
        s.sendto(b"u" * 300, ("127.0.0.1", listen))  # fits in; its echo no longer does
        wait_until(lambda: lt.call(lt.enforcer.quotas.handle, "fred").exhausted, what="budget used up")
        handle = lt.call(lt.enforcer.quotas.handle, "fred")
        assert handle.debited_total == 300 + back + 300  # whole datagrams only
        wait_until(lambda: lt.snapshot("uq")["active_flows"] == 0, what="the flow cut")
        s.sendto(b"u", ("127.0.0.1", listen))
        wait_until(lambda: lt.snapshot("uq")["quota_refused"] == 1, what="the new flow refused")
        s.close()
    finally:
        echo.close()


class SentFrames:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)
        return True


def test_the_agent_applies_updates_reports_exhaustion_and_marks_reports(lt, sink, monkeypatch):
    logs = LogCapture(monkeypatch)
    bundle = {"client_id": "edge-01", "client_name": "edge", "server_endpoint": "127.0.0.1:1",
              "server_cert_sha256": "0" * 64, "token": "t"}
    agent = lt.call(lambda: agent_mod.Agent(lt.loop, bundle, lt.runtime))
    assert {"rate_limit", "traffic_quota"} <= set(agent.capabilities)
    ch = SentFrames()
    agent.channel, agent.connected = ch, True
    listen = free_port()
    lt.call(agent._on_message, ch, m.owner_rate_limit_update("edge-01", "gina", "set",
                                                            {"concurrent_connections": 4}))
    assert lt.call(lambda: lt.enforcer.limits.owner_cap("gina").concurrent_connections) == 4
    lt.call(lt.runtime.activate, tcp_rule("g", listen, sink.port, owner="gina"))
    lt.call(agent._on_message, ch, quota_set("gina", 64 * 1024))
    assert logs.events("traffic_quota.applied_set", user="gina")
    c = socket.create_connection(("127.0.0.1", listen), timeout=5)
    b = Blaster(c, limit=MiB)
    wait_until(lambda: [x for x in ch.sent if x["type"] == "traffic_quota_exhausted"], what="exhaustion reported")
    b.stop()
    report = next(x for x in ch.sent if x["type"] == "traffic_quota_exhausted")
    assert report["user_id"] == "gina" and report["client_id"] == "edge-01"
    lt.call(agent._report, ch)
    report = [x for x in ch.sent if x["type"] == "stats_report"][-1]
    assert [row["owner"] for row in report["owners"]] == ["gina"]  # the envelope row (docs/rate-limits.md)
    assert set(report["owners"][0]) == {"owner", "active", "throttle_seconds", "bandwidth_dropped_in",
                                        "bandwidth_dropped_out"}
    assert "rejects" in report["rules"][0]["rate_limit"]
    assert lt.call(lambda: lt.enforcer.quotas.handle("gina")._unreported) == 0
    # a fresh state minus nothing unreported: forwarding resumes
    lt.call(agent._on_message, ch, quota_set("gina", 64 * 1024))
    assert not lt.call(lambda: lt.enforcer.quotas.handle("gina").exhausted)
    lt.call(agent._on_message, ch, m.owner_rate_limit_update("edge-01", "gina", "remove"))
    assert lt.call(lambda: lt.enforcer.limits.owner_cap("gina")) is None
    c.close()


def first_flight(server_name: str) -> bytes:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_an_sni_routed_failover_connection_debits_every_byte_it_moves(lt):
    listen, dead, echo_port = free_port(), free_port(), free_port()
    echo = TcpEchoServer([echo_port])
    try:
        rule = Rule.from_dict({"rule_id": "sq", "listen_port": listen, "sni_pattern": "q.example.com",
                               "owner": "hana",
                               "targets": [{"host": "127.0.0.1", "port": dead, "priority": 1},
                                           {"host": "127.0.0.1", "port": echo_port, "priority": 2}]})
        assert lt.call(lt.runtime.activate, rule).state == "active"
        apply(lt, quota_set("hana", MiB))
        hello = first_flight("q.example.com")
        c = socket.create_connection(("127.0.0.1", listen), timeout=10)
        c.sendall(hello + b"payload")
        want = len(hello) + len(b"payload")
        got = b""
        while len(got) < want:
            chunk = c.recv(65536)
            assert chunk
            got += chunk
        c.close()
        wait_until(lambda: lt.call(lt.enforcer.quotas.handle, "hana").debited_total == 2 * want,
                   what="the hello and the payload debited both ways")
        snap = lt.snapshot("sq")
        assert snap["connect_failures"] >= 1 and snap["bytes_in"] == want and snap["bytes_out"] == want
    finally:
        echo.close()
