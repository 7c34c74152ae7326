"""kill -9 the server during a burst of pushes: nothing acknowledged is lost, listeners never flap."""

from __future__ import annotations

import json
import signal
import socket
import threading

from conftest import free_port, free_port_block
from cp import Server, enroll_client, wait_connected, write_server_toml
from peers import TcpEchoServer


def test_kill_9_during_push_burst_loses_no_acknowledged_rule(procs, tmp_path):
    data = tmp_path / "server"
    control = free_port()
    write_server_toml(data, control_listen=f"127.0.0.1:{control}")
    server = Server(procs, data)
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")

    target = free_port()
    echo = TcpEchoServer([target])
    base = free_port_block(60)
    acked: dict[str, int] = {}
    try:
        # one rule and a live connection through it before the crash
        res = server.cli("push-rule", "edge-01", str(base), f"127.0.0.1:{target}", check=True)
        first = res.stdout.strip()
        acked[first] = base
        live = socket.create_connection(("127.0.0.1", base), timeout=5)
        live.sendall(b"before")
        assert live.recv(6) == b"before"

        stop = threading.Event()

        def burst():
            for i in range(1, 60):
                if stop.is_set():
                    return
                r = server.cli("push-rule", "edge-01", str(base + i), f"127.0.0.1:{target}", "--ack-timeout", "5")
                if r.returncode == 0:
                    acked[r.stdout.strip()] = base + i
        t = threading.Thread(target=burst)
        t.start()
        # crash the server once a handful of pushes went through
        from conftest import wait_until
        wait_until(lambda: len(acked) >= 8, timeout=60, what="some pushes acknowledged")
        server.proc.p.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        stop.set()
        t.join(120)

        activated_before = {e["rule"] for e in agent.events("rule.activated")}
        assert set(acked) <= activated_before

        server2 = Server(procs, data)
        agent.wait_event("control.connected", pred=lambda e: True, timeout=30)
        wait_until(lambda: len([e for e in agent.events("control.connected")]) >= 2, timeout=30,
                   what="agent to reconnect")
        wait_until(lambda: any(e for e in server2.proc.events("client.replayed")), timeout=30, what="replay")
        rules = {r["rule_id"]: r for r in json.loads(server2.cli("list-rules", "--format", "json", check=True).stdout)}
        missing = set(acked) - set(rules)
        assert not missing, f"acknowledged rules lost in the crash: {missing}"
        for rid in acked:
            assert rules[rid]["state"] == "active"
        # unchanged rules were kept running: no removal, no second activation, the old connection lives
        assert not agent.events("rule.removed")
        activations = [e["rule"] for e in agent.events("rule.activated")]
        assert all(activations.count(rid) == 1 for rid in acked)
        live.sendall(b"after")
        assert live.recv(5) == b"after"
        # and every acknowledged port forwards
        for rid, port in acked.items():
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            c.close()
        live.close()
    finally:
        echo.close()
