"""A second enrolled client can neither change nor invent anything about the first one's rules (issue 8)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from conftest import free_port, free_port_block, wait_until
from cp import Server, enroll_client, wait_connected, write_server_toml
from peers import TcpEchoServer
from rawpeer import (RawPeer, api, enrolled_token, metric_value, metrics, push_owned_rule, rss_kib,
                     server_pid)
from test_standalone_tcp import roundtrip

REJECTED = "portunus_control_rejected_messages_total"


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def rule_row(server: Server, rule_id: str) -> dict:
    [row] = [r for r in json.loads(server.cli("list-rules", "--format", "json", check=True).stdout)
             if r["rule_id"] == rule_id]
    return row


def rule_stats(server: Server, rule_id: str, query: str = "") -> tuple[int, dict]:
    return api(server, "GET", f"/v1/rules/{rule_id}/stats{query}")


def rejected(server: Server, reason: str) -> float:
    status, text = metrics(server)
    assert status == 200
    return metric_value(text, f'{REJECTED}{{reason="{reason}"}}') or 0


def test_second_client_cannot_fail_hide_or_fake_stats_of_the_first_clients_rule(server, procs, tmp_path):
    agent, bundle = enroll_client(server, procs, tmp_path, "edge-01")
    wait_connected(server, "edge-01")
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        res = server.cli("push-rule", "edge-01", str(listen), f"127.0.0.1:{target}")
        assert res.returncode == 0, res.stderr
        victim = res.stdout.strip()
        push = server.proc.wait_event("rule.push", pred=lambda e: e.get("rule") == victim)
        assert roundtrip(listen, b"before") == b"before"
        wait_until(lambda: rule_stats(server, victim)[1]["bytes_in"] == 6, timeout=15, interval=0.3,
                   what="the victim's own stats")

        _, token = enrolled_token(server, tmp_path, "edge-evil")
        evil = RawPeer(server.control_port)
        evil.hello(token)
        for request_id in (None, push["request_id"], "made-up"):
            evil.send({"type": "rule_status", "rule_id": victim, "state": "failed", "reason": "pwned",
                       "request_id": request_id})
        evil.send({"type": "rule_status", "rule_id": victim, "state": "removed"})
        evil.send({"type": "stats_report", "at": time.time(),
                   "rules": [{"rule_id": victim, "bytes_in": 999999, "bytes_out": 999999,
                              "per_port": [{"listen_port": listen, "bytes_in": 999999}]}]})
        server.proc.wait_event("control.message_rejected", pred=lambda e: e.get("reason") == "stats_unknown_rule")
        assert rejected(server, "rule_not_owned") == 4
        assert rejected(server, "stats_unknown_rule") == 1
        # once per session and reason, not once per message
        assert len([e for e in server.proc.events("control.message_rejected")
                    if e.get("reason") == "rule_not_owned"]) == 1

        assert rule_row(server, victim)["state"] == "active"
        status, stats = rule_stats(server, victim, "?per_port=true")
        assert status == 200 and stats["bytes_in"] == 6 and stats["per_port"][0]["bytes_in"] == 6
        assert metrics(server)[0] == 200

        # the victim reconnects: its rule is replayed and still forwards
        agent.signal(signal.SIGTERM)
        assert agent.wait(20) == 0
        wait_connected(server, "edge-01", connected=False)
        again = procs(agent.args)
        again.wait_event("rule.activated", timeout=20, pred=lambda e: e.get("rule") == victim)
        assert rule_row(server, victim)["state"] == "active"
        assert roundtrip(listen, b"after") == b"after"
        evil.close()
    finally:
        echo.close()
    assert not [line for line in server.proc.lines if "Traceback" in line]


def test_status_with_a_request_id_the_server_never_sent_is_dropped(server, tmp_path):
    _, token = enrolled_token(server, tmp_path, "edge-raw")
    peer = RawPeer(server.control_port)
    peer.hello(token)
    result = {}

    def post():
        result["res"] = api(server, "POST", "/v1/rules", {"client": "edge-raw", "listen": str(free_port()),
                                                           "target": "127.0.0.1:9", "ack_timeout_secs": 10})
    t = threading.Thread(target=post, daemon=True)
    t.start()
    push = peer.wait_for("rule_update", pred=lambda msg: msg.get("action") == "push")
    peer.send({"type": "rule_status", "rule_id": push["rule_id"], "state": "failed", "request_id": "forged"})
    server.proc.wait_event("control.message_rejected", pred=lambda e: e.get("reason") == "request_id_unknown")
    peer.send({"type": "rule_status", "rule_id": push["rule_id"], "state": "active",
               "request_id": push["request_id"]})
    t.join(20)
    status, body = result["res"]
    assert status == 201 and body["state"] == "active", body
    assert rejected(server, "request_id_unknown") == 1
    peer.close()


def test_poisoned_stats_never_break_metrics_or_rule_stats_and_memory_stays_bounded(server, tmp_path):
    _, token = enrolled_token(server, tmp_path, "edge-raw")
    peer = RawPeer(server.control_port)
    peer.hello(token)
    base = free_port_block(4)
    push = push_owned_rule(server, peer, "edge-raw", {"listen": f"{base}-{base + 3}",
                                                      "target": f"127.0.0.1:{base + 100}-{base + 103}"})
    rule_id = push["rule_id"]
    good = {"rule_id": rule_id, "bytes_in": 11, "bytes_out": 22,
            "per_port": [{"listen_port": base + 1, "bytes_in": 11, "bytes_out": 22}]}
    poison = [
        {**good, "bytes_in": "12"},
        {**good, "bytes_out": -1},
        {**good, "bytes_in": 1 << 64},
        {**good, "per_port": "everything"},
        {**good, "per_port": [{"listen_port": base + 99, "bytes_in": 1}]},
        {**good, "per_port": [{"listen_port": base, "bytes_in": "x"}]},
        {**good, "per_port": [{"listen_port": base}] * 5},
        {**good, "per_target": [{"index": 7}]},
        {**good, "per_target": "x"},
    ]
    peer.send({"type": "stats_report", "at": time.time(), "rules": [good]})
    wait_until(lambda: rule_stats(server, rule_id)[1].get("bytes_in") == 11, timeout=10, interval=0.2,
               what="the good report")
    for snap in poison:
        peer.send({"type": "stats_report", "at": time.time(), "rules": [snap]})
    peer.send({"type": "stats_report", "at": 1e308, "rules": [good]})  # a time gmtime() cannot take
    pid = server_pid(server)

    def invent(prefix: str) -> None:
        # 200 000 rule ids nobody owns, in frames under the 1 MiB cap
        for start in range(0, 200_000, 25_000):
            peer.send({"type": "stats_report", "at": time.time(),
                       "rules": [{"rule_id": f"{prefix}{i:07d}", "bytes_in": i} for i in range(start, start + 25_000)]})
        wait_until(lambda: rejected(server, "stats_unknown_rule") >= counted + 200_000, timeout=60, interval=0.5,
                   what="the invented ids to be rejected")

    counted = rejected(server, "stats_unknown_rule")
    invent("a")
    after_first = rss_kib(pid)
    counted = rejected(server, "stats_unknown_rule")
    invent("b")
    after_second = rss_kib(pid)
    assert after_second - after_first < 16 * 1024, (after_first, after_second)  # KiB: nothing was kept

    assert rejected(server, "stats_bad_counter") == 3
    assert rejected(server, "stats_malformed") == 6
    status, text = metrics(server)
    assert status == 200
    [row] = [line for line in text.splitlines()
             if line.startswith("portunus_rule_bytes_in_total{") and f'rule="{rule_id}"' in line]
    assert row.endswith(" 11") and 'client="edge-raw"' in row
    assert "a0000001" not in text and "b0000001" not in text
    status, body = api(server, "GET", "/v1/metrics")
    assert status == 200 and "portunus_rule_bytes_in_total" in body
    status, stats = rule_stats(server, rule_id, "?per_port=true&per_target=true")
    assert status == 200, stats
    assert stats["bytes_in"] == 11 and [p["bytes_in"] for p in stats["per_port"]] == [0, 11, 0, 0]
    assert rule_stats(server, rule_id, "?per_port=true")[0] == 200
    assert not [line for line in server.proc.lines if "Traceback" in line]
    peer.close()


def test_pre_auth_errors_and_hello_timeout_are_logged_once_per_source_and_reason(server):
    for _ in range(5):
        p = RawPeer(server.control_port)
        p.send_raw(b"\x00\x00\x00\x09{not json")
        assert p.recv(10) is None
        p.close()
    p = RawPeer(server.control_port)
    p.send({"type": "hello"})
    assert p.recv(10) is None
    p.close()
    p = RawPeer(server.control_port)
    p.send({"type": "pong", "nonce": 1})  # a valid message, but not a first one
    assert p.wait_for("error")["code"] == "protocol_error"
    p.close()
    server.proc.wait_event("control.rejected", pred=lambda e: e.get("reason") == "protocol_error")
    events = server.proc.wait_event("control.rejected", pred=lambda e: e.get("reason") == "message_missing_field")
    assert events["peer"].startswith("127.0.0.1:")
    bad_json = [e for e in server.proc.events("control.rejected") if e.get("reason") == "frame_invalid_json"]
    assert len(bad_json) == 1 and bad_json[0]["peer"].startswith("127.0.0.1:")
    idle = RawPeer(server.control_port)
    ev = server.proc.wait_event("control.rejected", timeout=20, pred=lambda e: e.get("reason") == "hello_timeout")
    assert "10 s" in ev["detail"]
    assert idle.recv(5) is None
    idle.close()
