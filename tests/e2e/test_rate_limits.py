"""Rate limits through a real server and a real client (SPEC §2.9, issue 13): connection caps
with accept-then-RST, the owner envelope over two rules, UDP drops, the splice predicate by log
events with a hot update (PUT rules/{id} {rate_limit}) that keeps the listener, and the counters
in /metrics and rule stats."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import free_port, wait_until
from cp import Server, enroll_client, write_server_toml
from peers import TcpEchoServer, UdpEchoServer
from quota_env import add_grant, add_user, call, metric, scrape
from portunus.relay.splice import splice_available

CLIENT = "edge-tokyo"


@pytest.fixture
def world(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    alice = add_user(server, "alice")
    agent, _ = enroll_client(server, procs, tmp_path, CLIENT)
    add_grant(server, "alice", CLIENT)
    return server, alice, agent


def push(server, token, body) -> dict:
    status, rule = call(server, "POST", "/v1/rules", {"client": CLIENT, **body}, token=token)
    assert status == 201, rule
    return rule


def outcome(port: int) -> str:
    """'ok' (echoed) or 'rst' (accept-then-reset)."""
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:
        return "rst"
    with c:
        try:
            c.sendall(b"e")
            return "ok" if c.recv(1) == b"e" else "closed"
        except (ConnectionResetError, BrokenPipeError):
            return "rst"


def limiter_stats(server, rule_id: str, pred) -> dict:
    def get():
        stats = call(server, "GET", f"/v1/rules/{rule_id}/stats")[1].get("rate_limit_stats")
        return stats if stats and pred(stats) else None
    return wait_until(get, timeout=15, interval=0.3, what=f"reported limiter counters of {rule_id}")


def test_connection_rate_and_concurrency_caps_reset_and_are_reported(world):
    server, alice, agent = world
    target = free_port()
    echo = TcpEchoServer([target])
    try:
        l1, l2 = free_port(), free_port()
        r1 = push(server, alice, {"listen_port": l1, "target": f"127.0.0.1:{target}",
                                  "rate_limit": {"new_connections_per_sec": 2, "new_connections_burst": 2}})
        r2 = push(server, alice, {"listen_port": l2, "target": f"127.0.0.1:{target}",
                                  "rate_limit": {"concurrent_connections": 1}})
        conns = []
        for _ in range(10):
            try:
                conns.append(socket.create_connection(("127.0.0.1", l1), timeout=5))
            except ConnectionResetError:  # the RST beat connect() back
                conns.append(None)
        results = []
        for c in conns:
            if c is None:
                results.append(False)
                continue
            try:
                c.sendall(b"e")
                results.append(c.recv(1) == b"e")
            except (ConnectionResetError, BrokenPipeError):
                results.append(False)
            c.close()
        assert results.count(True) == 2, results
        held = socket.create_connection(("127.0.0.1", l2), timeout=5)
        held.sendall(b"e")
        assert held.recv(1) == b"e"
        assert outcome(l2) == "rst"
        held.close()
        limiter_stats(server, r1["rule_id"], lambda s: s["rejects"]["conn_rate"] == 8)
        limiter_stats(server, r2["rule_id"], lambda s: s["rejects"]["conn_concurrent"] == 1)
        labels = f'client="{CLIENT}",rule="{r1["rule_id"]}",owner="alice"'
        assert metric(scrape(server), f'portunus_rate_limit_reject_total{{{labels},reason="conn_rate"}}') == 8
    finally:
        echo.close()


def test_the_owner_envelope_is_shared_by_two_rules(world):
    server, alice, agent = world
    target = free_port()
    echo = TcpEchoServer([target])
    try:
        l1, l2 = free_port(), free_port()
        push(server, alice, {"listen_port": l1, "target": f"127.0.0.1:{target}"})
        r2 = push(server, alice, {"listen_port": l2, "target": f"127.0.0.1:{target}"})
        client_id = call(server, "GET", "/v1/clients")[1]
        client_id = next(c["client_id"] for c in (client_id["clients"] if isinstance(client_id, dict) else client_id)
                         if c["client_name"] == CLIENT)
        status, _ = call(server, "PUT", f"/v1/clients/{client_id}/owners/alice/rate-limit",
                         {"rate_limit": {"concurrent_connections": 1}})
        assert status == 200
        agent.wait_event("owner_rate_limit.applied", pred=lambda e: e.get("owner") == "alice")
        held = socket.create_connection(("127.0.0.1", l1), timeout=5)
        held.sendall(b"e")
        assert held.recv(1) == b"e"
        assert outcome(l2) == "rst"  # the envelope binds over both rules
        limiter_stats(server, r2["rule_id"], lambda s: s["rejects"]["owner_concurrent"] == 1)
        assert call(server, "DELETE", f"/v1/clients/{client_id}/owners/alice/rate-limit")[0] == 200
        agent.wait_event("owner_rate_limit.applied", pred=lambda e: e.get("action") == "remove")
        assert outcome(l2) == "ok"
        held.close()
    finally:
        echo.close()


def test_udp_over_budget_datagrams_are_dropped_and_counted(world):
    server, alice, agent = world
    target = free_port()
    echo = UdpEchoServer([target])
    try:
        listen = free_port()
        rule = push(server, alice, {"protocol": "udp", "listen_port": listen, "target": f"127.0.0.1:{target}",
                                    "rate_limit": {"bandwidth_in_bps": 1000}})
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(10):
            s.sendto(b"d" * 400, ("127.0.0.1", listen))
        stats = limiter_stats(server, rule["rule_id"], lambda st: st["bandwidth_dropped_in"] >= 7)
        assert stats["bandwidth_dropped_in"] <= 8
        s.close()
    finally:
        echo.close()


@pytest.mark.skipif(not splice_available(), reason="splice is Linux only")
def test_the_splice_predicate_by_log_events_and_a_hot_update(world):
    server, alice, agent = world
    target = free_port()
    echo = TcpEchoServer([target])
    try:
        listen = free_port()
        rule = push(server, alice, {"listen_port": listen, "target": f"127.0.0.1:{target}",
                                    "rate_limit": {"bandwidth_in_bps": 10_000_000}})
        rid = rule["rule_id"]
        assert outcome(listen) == "ok"
        time.sleep(0.3)
        assert not agent.events("proxy.splice_selected")  # a capped rule runs userspace
        activated = len([e for e in agent.events("rule.activated") if e.get("rule") == rid])
        status, view = call(server, "PUT", f"/v1/rules/{rid}", {"rate_limit": None}, token=alice)
        assert status == 200 and view["client_notified"] is True
        agent.wait_event("rule.updated", pred=lambda e: e.get("rule") == rid)
        assert outcome(listen) == "ok"
        agent.wait_event("proxy.splice_selected", pred=lambda e: e.get("rule") == rid)
        # a hot update, not a rebind
        assert len([e for e in agent.events("rule.activated") if e.get("rule") == rid]) == activated
    finally:
        echo.close()
