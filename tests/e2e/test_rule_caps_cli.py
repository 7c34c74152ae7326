"""The rate-limit and SNI surfaces of the server CLI (SPEC §7.1; issue 13 point 6, issue 12 point 3):
push-rule cap flags in human units, every validation code with its exit code, the list-rules CAPS
column (caps text, sni=<pattern>, sni=fallback), and `owner-cap set|get|list|delete`."""

from __future__ import annotations

import json
import threading

import pytest

from cp import Server, write_server_toml
from quota_env import add_grant, add_user
from test_owner_caps_api import CAP_CAPS, NO_RATE_LIMIT, CapPeer


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def pushed_by_cli(server: Server, peer: CapPeer, *args) -> tuple[dict, str]:
    """`push-rule …` while the peer answers the push as an agent would: (the pushed rule, stdout)."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("res", server.cli("push-rule", *args)), daemon=True)
    t.start()
    push = peer.wait_type("rule_update", lambda msg: msg["action"] == "push")
    peer.send({"type": "rule_status", "rule_id": push["rule_id"], "state": "active",
               "request_id": push.get("request_id")})
    t.join(60)
    res = out["res"]
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == push["rule_id"]
    return push["rule"], res.stdout.strip()


def refused(res, code: str, exit_code: int) -> None:
    assert res.returncode == exit_code, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith(f"error: {code}:"), res.stderr
    assert "Traceback" not in res.stderr


def list_rows(server: Server) -> dict[str, str]:
    """rule id -> the CAPS column of `list-rules` (which may hold spaces: cut by the header's offsets)."""
    lines = server.cli("list-rules", check=True).stdout.splitlines()
    start, end = lines[0].index("CAPS"), lines[0].index("OWNER")
    return {line.split()[0]: line[start:end].strip() for line in lines[1:]}


def test_push_rule_cap_flags_take_human_units_and_list_rules_shows_them(server, tmp_path):
    peer = CapPeer(server, tmp_path, "edge-01", caps=CAP_CAPS + ["sni"]).connect()
    rule, rule_id = pushed_by_cli(server, peer, "edge-01", "20101", "127.0.0.1:9",
                                  "--bandwidth-in-bps", "1M", "--bandwidth-out-bps", "512K",
                                  "--new-connections-per-sec", "100", "--concurrent-connections", "1k",
                                  "--bandwidth-in-burst", "2MiB", "--new-connections-burst", "200")
    assert rule["rate_limit"] == {"bandwidth_in_bps": 1_000_000, "bandwidth_out_bps": 512_000,
                                  "new_connections_per_sec": 100, "concurrent_connections": 1000,
                                  "bandwidth_in_burst": 2 * 1024 * 1024, "new_connections_burst": 200}
    _, bits = pushed_by_cli(server, peer, "edge-01", "20102", "127.0.0.1:9", "--bandwidth-out-bps", "100Mbit")
    _, plain = pushed_by_cli(server, peer, "edge-01", "20103", "127.0.0.1:9")
    sni_rule, sni = pushed_by_cli(server, peer, "edge-01", "20104", "127.0.0.1:9", "--sni", "a.example.com",
                                  "--concurrent-connections", "5")
    _, fallback = pushed_by_cli(server, peer, "edge-01", "20104", "127.0.0.1:10")
    assert sni_rule["sni_pattern"] == "a.example.com"

    caps = list_rows(server)
    assert caps[rule_id] == "↓1.0M ↑512K 100/s ≤1000"
    assert caps[bits] == "↑13M"  # 12 500 000 B/s, shown in two or three figures
    assert caps[plain] == "-"
    assert caps[sni] == "sni=a.example.com ≤5"
    assert caps[fallback] == "sni=fallback"
    listed = {r["rule_id"]: r for r in json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)}
    assert listed[rule_id]["rate_limit"]["bandwidth_in_bps"] == 1_000_000


@pytest.mark.parametrize("flags,code,exit_code", [
    (["--bandwidth-in-bps", "0"], "validation.rate_limit_cap_zero", 2),
    (["--concurrent-connections", "0"], "validation.rate_limit_cap_zero", 2),
    (["--bandwidth-in-burst", "10"], "validation.rate_limit_burst_without_rate", 2),
    (["--new-connections-burst", "10"], "validation.rate_limit_burst_without_rate", 2),
    (["--bandwidth-in-bps", "1000", "--bandwidth-in-burst", "1"], "validation.rate_limit_burst_range", 2),
    (["--new-connections-per-sec", "2", "--new-connections-burst", "121"], "validation.rate_limit_burst_range", 2),
    (["--bandwidth-in-bps", "10Mb"], "validation.invalid_unit_value", 2),
    (["--concurrent-connections", "10MB"], "validation.invalid_unit_value", 2),
    (["--bandwidth-out-bps", "fast"], "validation.invalid_unit_value", 2),
])
def test_every_cap_validation_code_through_push_rule(server, tmp_path, flags, code, exit_code):
    peer = CapPeer(server, tmp_path, "edge-01").connect()
    refused(server.cli("push-rule", "edge-01", "20111", "127.0.0.1:9", *flags), code, exit_code)
    assert json.loads(server.cli("list-rules", "--format", "json", check=True).stdout) == []
    peer.close()


def test_owner_cap_commands(server, tmp_path):
    alice = add_user(server, "alice")
    peer = CapPeer(server, tmp_path, "edge-tokyo").connect()
    old = CapPeer(server, tmp_path, "edge-old", caps=NO_RATE_LIMIT).connect()
    for client, p in (("edge-tokyo", peer), ("edge-old", old)):
        add_grant(server, "alice", client)
        p.push_owned_rule(server, alice, {"client": client, "listen_port": 20121, "target": "127.0.0.1:9"})

    refused(server.cli("owner-cap", "set", "edge-tokyo", "alice"), "validation.rate_limit_no_caps_provided", 3)
    refused(server.cli("owner-cap", "set", "edge-tokyo", "alice", "--bandwidth-in-bps", "0"),
            "validation.rate_limit_cap_zero", 2)
    refused(server.cli("owner-cap", "set", "edge-tokyo", "alice", "--bandwidth-in-burst", "5"),
            "validation.rate_limit_burst_without_rate", 2)
    refused(server.cli("owner-cap", "set", "edge-tokyo", "alice", "--bandwidth-in-bps", "100",
                       "--bandwidth-in-burst", "100000"), "validation.rate_limit_burst_range", 2)
    refused(server.cli("owner-cap", "set", "edge-tokyo", "alice", "--bandwidth-in-bps", "1x"),
            "validation.invalid_unit_value", 2)
    refused(server.cli("owner-cap", "set", "edge-old", "alice", "--concurrent-connections", "3"),
            "rate_limit_unsupported_by_client", 3)
    refused(server.cli("owner-cap", "set", "edge-tokyo", "bob", "--concurrent-connections", "3"), "not_found", 8)
    refused(server.cli("owner-cap", "get", "no-such-client", "alice"), "not_found", 8)

    res = server.cli("owner-cap", "set", "edge-tokyo", "alice", "--bandwidth-in-bps", "10M",
                     "--concurrent-connections", "100", check=True)
    assert res.stdout.splitlines()[0] == f"alice on {peer.client_id}: ↓10M ≤100"
    push = peer.wait_type("owner_rate_limit_update")
    assert push["rate_limit"] == {"bandwidth_in_bps": 10_000_000, "concurrent_connections": 100}
    view = json.loads(server.cli("owner-cap", "get", "edge-tokyo", "alice", "--format", "json", check=True).stdout)
    assert view["rate_limit"] == push["rate_limit"] and view["owner_id"] == "alice"
    listed = server.cli("owner-cap", "list", "edge-tokyo", check=True).stdout.splitlines()
    assert listed[0].split() == ["OWNER", "RULES", "CAPS"]
    assert listed[1].split()[:2] == ["alice", "1"] and listed[1].endswith("↓10M ≤100")
    assert json.loads(server.cli("owner-cap", "list", "edge-tokyo", "--format", "json", check=True).stdout) == \
        [{"owner_id": "alice", "has_rate_limit": True, "rule_count": 1}]

    assert server.cli("owner-cap", "delete", "edge-tokyo", "alice", check=True).stdout.startswith("removed")
    assert peer.wait_type("owner_rate_limit_update")["action"] == "remove"
    refused(server.cli("owner-cap", "delete", "edge-tokyo", "alice"), "not_found", 8)
    assert server.cli("owner-cap", "get", "edge-tokyo", "alice", check=True).stdout.startswith(
        f"alice on {peer.client_id}: -")


def test_rate_limit_counters_of_a_real_client_on_metrics(procs, tmp_path):
    import socket

    from conftest import free_port, wait_until
    from cp import enroll_client, wait_connected
    from peers import TcpEchoServer
    from quota_env import metric, scrape

    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    enroll_client(server, procs, tmp_path, "edge-rl")
    wait_connected(server, "edge-rl")
    target = free_port()
    echo = TcpEchoServer([target])
    listen = free_port()
    try:
        res = server.cli("push-rule", "edge-rl", str(listen), f"127.0.0.1:{target}", "--concurrent-connections", "1")
        assert res.returncode == 0, res.stderr
        rule_id = res.stdout.strip()
        owner = json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)[0]["owner"] or ""
        held = socket.create_connection(("127.0.0.1", listen), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        try:  # accept-then-RST: the reset may come during connect or on the first read; never forwarded
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as refused_conn:
                refused_conn.sendall(b"y")
                assert refused_conn.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass

        labels = f'client="edge-rl",rule="{rule_id}",owner="{owner}"'

        def rows():
            text = scrape(server)
            return text if (metric(text, f'portunus_rate_limit_reject_total{{{labels},reason="conn_concurrent"}}')
                            or 0) >= 1 else None
        text = wait_until(rows, timeout=20, interval=0.3, what="the reject row")
        assert metric(text, f'portunus_rate_limit_active_connections{{{labels}}}') == 1
        assert metric(text, f'portunus_rate_limit_throttle_seconds_total{{{labels},direction="in"}}') == 0
        assert "rate limit: active 1, rejects conn_concurrent=1" in server.cli("rule-stats", rule_id, check=True).stdout

        assert owner  # the operator token's user owns what it pushes
        if owner:  # an owner envelope adds its rule="" rows
            server.cli("owner-cap", "set", "edge-rl", owner, "--concurrent-connections", "10", check=True)
            row = f'portunus_rate_limit_active_connections{{client="edge-rl",rule="",owner="{owner}"}}'
            wait_until(lambda: metric(scrape(server), row) == 1, timeout=20, interval=0.3, what="the owner row")
        held.close()
    finally:
        echo.close()
