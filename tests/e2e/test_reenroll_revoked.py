"""Re-enrollment lifts a revocation (seed 004: "generate a re-enrollment command and run it on the
edge host"): same id, every rule back, and the old bundle stays dead with token_revoked."""

from __future__ import annotations

import json
import subprocess

from conftest import free_port, portunus_cmd, wait_until
from cp import Server, enroll_client, wait_connected, write_server_toml
from peers import TcpEchoServer
from test_standalone_tcp import roundtrip


def test_revoke_then_reenroll_brings_the_client_and_its_rules_back(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    agent, old_bundle = enroll_client(server, procs, tmp_path, "edge-01")
    cid = json.loads(old_bundle.read_text())["client_id"]
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        res = server.cli("push-rule", "edge-01", str(listen), f"127.0.0.1:{target}", "--ack-timeout", "3")
        assert res.returncode == 0, res.stderr
        rule_id = res.stdout.strip()

        assert server.cli("revoke", "edge-01").returncode == 0
        assert agent.wait(20) != 0

        res = server.cli("reenroll-client", "edge-01")
        assert res.returncode == 0, res.stderr
        uri = res.stdout.strip().split("'")[1]
        new_bundle = tmp_path / "new.bundle.json"
        out = subprocess.run(portunus_cmd("client") + ["enroll", uri, "--out", str(new_bundle)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(new_bundle.read_text())["client_id"] == cid

        agent2 = procs(portunus_cmd("client") + ["--bundle", str(new_bundle), "--reconnect-initial-delay-ms", "100"])
        agent2.wait_event("rule.activated", timeout=20, pred=lambda e: e.get("rule") == rule_id)
        c = wait_connected(server, "edge-01")
        assert (c["client_id"], c["revoked"]) == (cid, False)
        wait_until(lambda: roundtrip(listen, b"back again") == b"back again", timeout=10, what="rule forwards")

        # the bundle from before the revocation is still refused
        old = procs(portunus_cmd("client") + ["--bundle", str(old_bundle)])
        assert old.wait(20) != 0
        ev = old.events("auth.failure")
        assert ev and ev[0]["reason"] == "token_revoked", old.log_text()
        assert wait_connected(server, "edge-01")["client_id"] == cid  # the new session was not disturbed
    finally:
        echo.close()
