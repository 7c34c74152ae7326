"""The seed walkthrough, end to end: serve -> enroll -> client -> push -> bytes -> stats -> remove."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import urllib.request

import pytest

from conftest import free_port, free_port_block, portunus_cmd, require_tool, wait_until
from cp import OPERATOR_TOKEN, Server, enroll_client, wait_connected, write_server_toml
from peers import TcpEchoServer, UdpEchoServer
from test_standalone_tcp import roundtrip


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def _free_range(width: int):
    return free_port_block(width)


def test_seed_walkthrough_range_bytes_stats_metrics_remove(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    mode = stat.S_IMODE(os.stat(bundle).st_mode)
    assert mode == 0o600
    b = json.loads(bundle.read_text())
    assert set(b) == {"version", "client_id", "client_name", "server_endpoint", "server_cert_sha256", "token"}
    c = wait_connected(server, "edge-01")
    assert c["client_id"] == b["client_id"]

    listen, target = _free_range(100), _free_range(100)
    echo = TcpEchoServer(range(target, target + 100), prefix_port=True)
    try:
        res = server.cli("push-rule", "edge-01", f"{listen}-{listen + 99}", f"127.0.0.1:{target}-{target + 99}")
        assert res.returncode == 0, res.stderr
        rule_id = res.stdout.strip()
        assert rule_id and "\n" not in rule_id
        # one request_id threads the operator request, the push and the client's activation
        push = server.proc.wait_event("rule.push", pred=lambda e: e.get("rule") == rule_id)
        rid = push["request_id"]
        assert rid
        assert server.proc.events("operator.allow") and any(
            e.get("request_id") == rid and e.get("path") == "/v1/rules" for e in server.proc.events("operator.allow"))
        agent.wait_event("rule.activated", pred=lambda e: e.get("rule") == rule_id and e.get("request_id") == rid)

        payload = os.urandom(1 << 20)
        for off in (0, 37, 99):
            got = roundtrip(listen + off, payload)
            prefix = f"{target + off}:".encode()
            assert got.startswith(prefix)
            assert hashlib.sha256(got[len(prefix):]).digest() == hashlib.sha256(payload).digest()

        def counted():
            r = server.cli("rule-stats", rule_id, "--per-port", "--format", "json")
            s = json.loads(r.stdout)
            return s if s["bytes_in"] == 3 * len(payload) else None
        stats = wait_until(counted, timeout=15, interval=0.3, what="stats report")
        rows = {p["listen_port"]: p for p in stats["per_port"]}
        assert len(rows) == 100
        assert rows[listen + 37]["bytes_in"] == len(payload)
        assert rows[listen + 1]["bytes_in"] == 0

        listing = server.cli("list-rules", "--format", "json", check=True)
        rules = json.loads(listing.stdout)
        assert [r["rule_id"] for r in rules] == [rule_id]
        assert rules[0]["state"] == "active"

        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        rows = [line for line in text.splitlines() if line.startswith("portunus_rule_bytes_in_total{")]
        assert len(rows) == 1 and f'rule="{rule_id}"' in rows[0]
        assert 'portunus_clients_connected{client="edge-01"} 1' in text.splitlines()

        res = server.cli("remove-rule", rule_id)
        assert res.returncode == 0, res.stderr
        agent.wait_event("rule.removed", pred=lambda e: e.get("rule") == rule_id)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen + 37), timeout=2)
    finally:
        echo.close()


def test_metrics_pass_promtool(server, procs, tmp_path):
    promtool = require_tool("promtool")
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    port, target = free_port(), free_port()
    assert server.cli("push-rule", "edge-01", str(port), f"127.0.0.1:{target}").returncode == 0
    port2, target2 = free_port(), free_port()
    assert server.cli("push-rule", "edge-01", str(port2), f"127.0.0.1:{target2}", "--protocol", "udp").returncode == 0
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read()
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    req = urllib.request.Request(server.api + "/v1/metrics", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert b"portunus_rule_udp_datagrams_in_total" in urllib.request.urlopen(req, timeout=5).read()


def test_exit_codes_held_port_and_offline_client(server, procs, tmp_path):
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    held = free_port()
    holder = socket.socket()
    holder.bind(("0.0.0.0", held))
    holder.listen()
    try:
        res = server.cli("push-rule", "edge-01", str(held), "127.0.0.1:9")
        assert res.returncode == 5, res.stderr
        assert f"error: activation_failed: port_in_use (port {held} already bound)" in res.stderr
        rules = json.loads(server.cli("list-rules", "--format", "json").stdout)
        assert rules[0]["state"] == "failed"
        # the failed rule blocks its port until removed
        res = server.cli("push-rule", "edge-01", str(held), "127.0.0.1:10")
        assert res.returncode == 5 and "port_in_use" in res.stderr
    finally:
        holder.close()

    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    wait_connected(server, "edge-01", connected=False)
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert 'portunus_clients_connected{client="edge-01"} 0' in text.splitlines()  # issue 7: 1, then 0
    res = server.cli("push-rule", "edge-01", str(free_port()), "127.0.0.1:9")
    assert res.returncode == 4
    assert "error: client_not_connected:" in res.stderr
    assert len(json.loads(server.cli("list-rules", "--format", "json").stdout)) == 1  # nothing stored


def test_second_serve_on_one_data_dir_exits_75(server, procs):
    p = procs(portunus_cmd("server") + ["--data-dir", str(server.data_dir), "serve"],
              env={"PORTUNUS_ALLOW_ANY_FS": "1"})
    assert p.wait(30) == 75
    assert any("store_in_use" in line for line in p.lines), p.log_text()


def test_newer_schema_exits_78(procs, tmp_path):
    import sqlite3
    data = tmp_path / "server"
    write_server_toml(data)
    s = Server(procs, data)
    s.proc.signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0
    db = sqlite3.connect(data / "state.db")
    db.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, 'future', '2099-01-01T00:00:00Z')")
    db.commit()
    db.close()
    p = procs(portunus_cmd("server") + ["--data-dir", str(data), "serve"], env={"PORTUNUS_ALLOW_ANY_FS": "1"})
    assert p.wait(30) == 78
    assert any("schema_version_too_new" in line for line in p.lines)


def test_wrong_pin_client_exits_nonzero_without_sending_token(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    agent.signal(signal.SIGTERM)
    agent.wait(20)
    connected_before = len(server.proc.events("client.connected"))
    b = json.loads(bundle.read_text())
    b["server_cert_sha256"] = "0" * 64
    bad = tmp_path / "bad.bundle.json"
    bad.write_text(json.dumps(b))
    os.chmod(bad, 0o600)
    p = procs(portunus_cmd("client") + ["--bundle", str(bad)])
    rc = p.wait(30)
    assert rc != 0
    ev = p.events("control.tls_pinned_mismatch")
    assert ev and ev[0]["expected"] == "0" * 64 and len(ev[0]["got"]) == 64
    # the server saw no hello: no auth failure, no connection
    assert not server.proc.events("auth.failure")
    assert len(server.proc.events("client.connected")) == connected_before
    assert b["token"] not in "\n".join(p.lines)


def test_revoke_cuts_live_client_and_restart_fails(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    res = server.cli("revoke", "edge-01")
    assert res.returncode == 0, res.stderr
    server.proc.wait_event("client.disconnected", pred=lambda e: e.get("reason") == "token_revoked")
    assert agent.wait(20) != 0
    again = procs(portunus_cmd("client") + ["--bundle", str(bundle)])
    assert again.wait(20) != 0
    ev = again.events("auth.failure")
    assert ev and ev[0]["reason"] == "token_revoked"


def test_rename_keeps_id_and_session_and_refs(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    cid = json.loads(bundle.read_text())["client_id"]
    wait_connected(server, "edge-01")
    assert server.cli("rename-client", "edge-01", "--name", "edge-tokyo").returncode == 0
    c = wait_connected(server, "edge-tokyo")
    assert c["client_id"] == cid
    assert not agent.events("control.disconnected")
    # duplicate names make a name reference ambiguous (exit 9), ids still work
    enroll_client(server, procs, tmp_path, "edge-tokyo")
    res = server.cli("push-rule", "edge-tokyo", str(free_port()), "127.0.0.1:9")
    assert res.returncode == 9 and "client_ambiguous" in res.stderr
    res = server.cli("push-rule", cid, str(free_port()), "127.0.0.1:9")
    assert res.returncode == 0, res.stderr


def test_udp_gate_with_client_declaring_only_tcp(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "old-edge", env={"PORTUNUS_CLIENT_CAPABILITIES": ""})
    wait_connected(server, "old-edge")
    res = server.cli("push-rule", "old-edge", str(free_port()), "127.0.0.1:53", "--protocol", "udp")
    assert res.returncode == 3
    assert "error: unsupported_protocol:" in res.stderr
    assert json.loads(server.cli("list-rules", "--format", "json").stdout) == []


def test_udp_rule_through_server_and_client(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, target = free_port_block(4), free_port_block(4)
    echo = UdpEchoServer(range(target, target + 4))
    try:
        res = server.cli("push-rule", "edge-01", f"{listen}-{listen + 3}", f"127.0.0.1:{target}-{target + 3}",
                         "--protocol", "udp")
        assert res.returncode == 0, res.stderr
        for off in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            s.sendto(b"ping", ("127.0.0.1", listen + off))
            data, _ = s.recvfrom(100)
            assert data == f"{target + off}:ping".encode()
            s.close()
    finally:
        echo.close()


def test_api_errors_are_json_and_never_kill_the_server(server):
    def call(method, path, body=None, headers=None, token=OPERATOR_TOKEN):
        req = urllib.request.Request(server.api + path, data=body, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    import urllib.error
    assert call("GET", "/v1/clients", token=None)[0] == 401
    assert call("GET", "/v1/clients", token="wrong")[1]["error"]["code"] == "unauthenticated"
    status, body = call("POST", "/v1/rules", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = call("POST", "/v1/rules", b"[1,2]", {"Content-Type": "application/json"})
    assert status == 400
    status, body = call("POST", "/v1/rules", json.dumps({"client": "x", "listen_port": 70000,
                                                          "target": "a:1"}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"].startswith("validation.")
    assert "70000" in body["error"]["message"]
    status, body = call("GET", "/v1/rules/nope")
    assert status == 404
    big = b"{" + b" " * (2 << 20) + b"}"
    try:
        status, body = call("POST", "/v1/client-enrollments", big, {"Content-Type": "application/json"})
        assert status == 413
    except (ConnectionError, urllib.error.URLError):
        pass  # the server may close before reading it all; it must survive either way
    assert call("GET", "/v1/clients")[0] == 200
    spec = json.loads(urllib.request.urlopen(server.api + "/v1/openapi.json", timeout=5).read())
    assert "/v1/rules" in spec["paths"]


def test_no_superadmin_answers_503_bootstrap_required(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    toml = (data / "server.toml").read_text()
    (data / "server.toml").write_text("\n".join(l for l in toml.splitlines() if not l.startswith("operator_token")))
    s = Server(procs, data)
    s.proc.wait_event("startup.no_superadmin")
    res = s.cli("list-clients")
    assert res.returncode == 1 and "error: bootstrap_required:" in res.stderr
    assert "bootstrap-superadmin" in res.stderr


def test_revoked_client_can_be_deleted_with_its_rules(server, procs, tmp_path):
    agent, _ = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    assert server.cli("push-rule", "edge-01", str(free_port()), "127.0.0.1:9").returncode == 0
    res = server.cli("delete-client", "edge-01")
    assert res.returncode == 9 and "conflict.client_not_revoked" in res.stderr
    assert server.cli("revoke", "edge-01").returncode == 0
    res = server.cli("delete-client", "edge-01")
    assert res.returncode == 0, res.stderr
    assert json.loads(server.cli("list-rules", "--format", "json").stdout) == []
    assert json.loads(server.cli("list-clients", "--format", "json").stdout) == []


def test_failed_rule_is_not_retried_on_reconnect(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    held = free_port()
    holder = socket.socket()
    holder.bind(("0.0.0.0", held))
    holder.listen()
    try:
        assert server.cli("push-rule", "edge-01", str(held), "127.0.0.1:9").returncode == 5
    finally:
        holder.close()  # the port is free now, but the failed rule must stay failed
    agent.signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    again = procs(portunus_cmd("client") + ["--bundle", str(bundle)])
    again.wait_event("control.connected")
    server.proc.wait_event("client.replayed", pred=lambda e: e.get("rules") == 0)
    assert not again.events("rule.activated")
    rules = json.loads(server.cli("list-rules", "--format", "json").stdout)
    assert rules[0]["state"] == "failed"


def test_invalid_seed_fails_closed_and_stores_nothing(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    first = Server(procs, data)  # generates a certificate that does not cover other.example.com
    first.proc.signal(signal.SIGTERM)
    assert first.proc.wait(20) == 0
    s = Server(procs, data, env={"PORTUNUS_ADVERTISED_ENDPOINT": "other.example.com:7443"})
    s.proc.wait_event("startup.advertised_endpoint_invalid")
    for _ in range(2):
        res = s.cli("enroll-client", "edge-x")
        assert res.returncode == 3 and "error: endpoint_not_in_cert_san:" in res.stderr
    assert json.loads(s.cli("list-clients", "--format", "json").stdout) == []


def test_target_flag_keeps_a_port_range(server, procs, tmp_path):
    enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, target = free_port_block(2), free_port_block(2)
    echo = TcpEchoServer(range(target, target + 2), prefix_port=True)
    try:
        res = server.cli("push-rule", "edge-01", f"{listen}-{listen + 1}", "--target",
                         f"127.0.0.1:{target}-{target + 1}")
        assert res.returncode == 0, res.stderr
        got = roundtrip(listen + 1, b"hi")
        assert got == f"{target + 1}:hi".encode()
    finally:
        echo.close()


def test_advertised_endpoint_override_fails_closed_and_feeds_enrollments(server):
    def call(method, body=None):
        req = urllib.request.Request(server.api + "/v1/settings/advertised-endpoint", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {OPERATOR_TOKEN}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    import urllib.error
    status, info = call("GET")
    assert status == 200 and info["override"] is None and info["source"] in ("loopback", "request_host")
    for bad in ("https://localhost:7443", "localhost", "local host:1", "[::1]:7443", "localhost:7443/x"):
        status, body = call("PUT", {"override": bad})
        assert status == 422 and body["error"]["code"] == "endpoint_invalid", bad
    status, body = call("PUT", {"override": "other.example.com:7443"})
    assert status == 422 and body["error"]["code"] == "endpoint_not_in_cert_san"
    assert call("GET")[1]["override"] is None  # not persisted
    status, info = call("PUT", {"override": "localhost:17443"})
    assert status == 200 and info == {"override": "localhost:17443", "effective": "localhost:17443",
                                      "source": "override", "diagnostic": None}
    res = server.cli("enroll-client", "edge-09")
    assert "portunus://localhost:17443/enroll?" in res.stdout
    status, info = call("PUT", {"override": None})
    assert status == 200 and info["override"] is None
