"""Traffic quotas and history over the real API (SPEC §4.4, §6, §8.1; seed 004 "Traffic quotas"):
every route's shape and error codes, who may read what, pushes and the reconnect replay seen by a
raw control peer, accounting from real bytes through a real client, a server restart."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import free_port, portunus_cmd, require_tool, wait_until
from cp import OPERATOR_TOKEN, Server, wait_connected, write_server_toml
from peers import TcpEchoServer
from quota_env import VIEW_KEYS, QuotaPeer, add_grant, add_user, call, error_code, metric, scrape
from rawpeer import RawPeer, enrolled_token
from test_standalone_tcp import roundtrip

MiB = 1 << 20


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def quota_path(user="alice", client="edge-tokyo") -> str:
    return f"/v1/users/{user}/quotas/{client}"


def test_quota_crud_shapes_errors_pushes_and_access(server, tmp_path):
    alice, bob = add_user(server, "alice"), add_user(server, "bob")
    peer = QuotaPeer(server, tmp_path, "edge-tokyo").connect()
    add_grant(server, "alice", "edge-tokyo")

    # validation, in the order the body is read
    for body, code in (({}, "invalid_quota_size"), ({"monthly_bytes": -1}, "invalid_quota_size"),
                       ({"monthly_bytes": "4MiB"}, "invalid_quota_size"), ({"monthly_bytes": 1.5}, "invalid_quota_size"),
                       ({"monthly_bytes": 1, "billing_anchor": -5}, "invalid_billing_anchor"),
                       ({"monthly_bytes": 1, "billing_anchor": 10 ** 12}, "invalid_billing_anchor"),
                       ({"monthly_bytes": 1, "billing_anchor": "2026-01-01"}, "invalid_billing_anchor")):
        answer = call(server, "PUT", quota_path(), body)
        assert answer[0] == 400 and error_code(answer) == code, (body, answer)
    for path in (quota_path("nobody"), quota_path(client="no-such-client"), quota_path("bob")):
        answer = call(server, "PUT", path, {"monthly_bytes": 4 * MiB})
        assert answer[0] == 422 and error_code(answer) == "quota_target_not_found", (path, answer)
    assert "grant" in call(server, "PUT", quota_path("bob"), {"monthly_bytes": 1})[1]["error"]["message"]

    anchor = int(time.time()) - 3600
    status, view = call(server, "PUT", quota_path(), {"monthly_bytes": 4 * MiB, "billing_anchor": anchor})
    assert status == 201 and set(view) == VIEW_KEYS
    assert view["client_id"] == peer.client_id and view["client_name"] == "edge-tokyo"
    assert view["billing_anchor"] == view["current_period_started_at"] == anchor
    assert view["current_period_ends_at"] > anchor + 27 * 86400
    assert (view["current_period_bytes_used"], view["budget_remaining_bytes"], view["exhausted"],
            view["exhausted_at"], view["last_report_at"]) == (0, 4 * MiB, False, None, None)
    push = peer.wait_update()
    assert push["user_id"] == "alice" and push["client_id"] == peer.client_id and push["action"] == "set"
    assert push["state"] == {"monthly_bytes": 4 * MiB, "budget_remaining_bytes": 4 * MiB,
                             "period_started_at": anchor, "period_ends_at": view["current_period_ends_at"],
                             "exhausted": False}

    status, again = call(server, "PUT", quota_path(client=peer.client_id), {"monthly_bytes": 8 * MiB})
    assert status == 200 and again["monthly_bytes"] == 8 * MiB and again["billing_anchor"] == anchor
    answer = call(server, "PUT", quota_path(), {"monthly_bytes": 8 * MiB, "billing_anchor": anchor + 1})
    assert answer[0] == 400 and error_code(answer) == "invalid_billing_anchor"
    assert peer.wait_update()["state"]["monthly_bytes"] == 8 * MiB

    status, patched = call(server, "PATCH", quota_path(), {"monthly_bytes": 0, "clear_period_usage": True})
    assert status == 200 and patched["exhausted"] and patched["exhausted_at"] and patched["budget_remaining_bytes"] == 0
    assert peer.wait_update()["state"]["exhausted"] is True
    for method in ("PATCH", "DELETE"):
        answer = call(server, method, quota_path("bob"), {"clear_period_usage": True} if method == "PATCH" else None)
        assert answer[0] == 404 and error_code(answer) == "quota_not_found", answer
    answer = call(server, "GET", quota_path("bob") + "/status")
    assert answer[0] == 404 and error_code(answer) == "quota_not_found"

    # lists and status, as superadmin
    status, listing = call(server, "GET", "/v1/users/alice/quotas")
    assert status == 200 and [q["client_name"] for q in listing["quotas"]] == ["edge-tokyo"]
    assert call(server, "GET", f"/v1/clients/{peer.client_id}/quotas")[1]["quotas"][0]["user_id"] == "alice"
    assert call(server, "GET", "/v1/users/bob/quotas") == (200, {"quotas": []})
    assert error_code(call(server, "GET", "/v1/users/nobody/quotas")) == "not_found"
    assert set(call(server, "GET", quota_path() + "/status")[1]) == VIEW_KEYS

    # a user reads their own quota and traffic, nothing else
    assert call(server, "GET", quota_path() + "/status", token=alice)[0] == 200
    assert call(server, "GET", "/v1/users/alice/quotas", token=alice)[0] == 200
    assert call(server, "GET", "/v1/users/alice/traffic", token=alice)[0] == 200
    for path in ("/v1/users/alice/quotas", quota_path() + "/status", "/v1/users/alice/traffic"):
        answer = call(server, "GET", path, token=bob)
        assert answer[0] == 403 and error_code(answer) == "not_owner", (path, answer)
    for method, path in (("PUT", quota_path()), ("PATCH", quota_path()), ("DELETE", quota_path()),
                         ("GET", f"/v1/clients/{peer.client_id}/quotas"), ("GET", "/v1/clients/edge-tokyo/traffic"),
                         ("GET", "/v1/traffic/global")):
        answer = call(server, method, path, {"monthly_bytes": 1} if method in ("PUT", "PATCH") else None, token=alice)
        assert answer[0] == 403 and error_code(answer) == "role_required", (method, path, answer)

    # metrics on both listeners
    text = scrape(server)
    row = '{user="alice",client="edge-tokyo"}'
    assert metric(text, "portunus_traffic_quota_exhausted" + row) == 1
    assert metric(text, "portunus_traffic_quota_bytes_limit" + row) == 0
    assert metric(text, "portunus_traffic_quota_bytes_used" + row) == 0
    assert metric(text, "portunus_traffic_quota_exhausted_total" + row) == 1
    assert metric(text, "portunus_traffic_quota_period_resets_total" + row) == 0
    assert "# TYPE portunus_traffic_quota_exhausted_total counter" in text
    assert "portunus_traffic_quota_bytes_used" + row in call(server, "GET", "/v1/metrics")[1]

    status, gone = call(server, "DELETE", quota_path())
    assert status == 200 and gone["removed"] is True and gone["quota"]["user_id"] == "alice"
    removal = peer.wait_update()
    assert removal["action"] == "remove" and removal["user_id"] == "alice" and removal.get("state") is None
    assert error_code(call(server, "DELETE", quota_path())) == "quota_not_found"
    assert "portunus_traffic_quota_bytes_used{" not in scrape(server)

    doc = call(server, "GET", "/v1/openapi.json")[1]
    for path in ("/v1/users/{u}/quotas", "/v1/users/{u}/quotas/{client}", "/v1/users/{u}/quotas/{client}/status",
                 "/v1/users/{u}/traffic", "/v1/clients/{id}/quotas", "/v1/clients/{id}/traffic", "/v1/traffic/global"):
        assert path in doc["paths"], path
    assert set(doc["paths"]["/v1/users/{u}/quotas/{client}"]) == {"put", "patch", "delete"}
    peer.close()


def test_history_errors_and_row_cap(server, tmp_path):
    add_user(server, "alice")
    now = int(time.time())
    for query, status, code in (("from=abc", 400, "invalid_time_range"), (f"from={now}&to={now}", 400,
                                                                           "invalid_time_range"),
                                (f"from={now}&to={now - 60}", 400, "invalid_time_range"),
                                ("to=-1", 400, "invalid_time_range"), ("bucket=5m", 400, "invalid_bucket"),
                                (f"from={now - 8 * 86400}&bucket=1m", 422, "quota_bucket_out_of_retention"),
                                (f"from={now - 91 * 86400}&bucket=1h", 422, "quota_bucket_out_of_retention")):
        for path in ("/v1/traffic/global", "/v1/users/alice/traffic"):
            answer = call(server, "GET", f"{path}?{query}")
            assert answer[0] == status and error_code(answer) == code, (path, query, answer)
    assert error_code(call(server, "GET", "/v1/clients/no-such-client/traffic")) == "not_found"
    status, empty = call(server, "GET", "/v1/traffic/global")
    assert status == 200 and empty == {"bucket": "1m", "samples": [], "total_bytes_in": 0, "total_bytes_out": 0}
    assert call(server, "GET", f"/v1/traffic/global?from={now - 2 * 86400}")[1]["bucket"] == "1h"

    # 10 001 one-minute rows of history (written as the accounting would) are more than one answer holds
    start = now - now % 60 - 10_001 * 60
    db = sqlite3.connect(server.data_dir / "state.db", timeout=10)
    with db:
        db.executemany("INSERT INTO traffic_samples_1m (user_id, client_id, ts, bytes_in, bytes_out) "
                       "VALUES ('alice', 'C-GONE', ?, 1, 2)", [(start + i * 60,) for i in range(10_001)])
    db.close()
    answer = call(server, "GET", f"/v1/traffic/global?from={start}&bucket=1m")
    assert answer[0] == 422 and error_code(answer) == "traffic_too_many_rows"
    status, some = call(server, "GET", f"/v1/users/alice/traffic?from={start}&to={start + 600}&bucket=1m")
    assert status == 200 and len(some["samples"]) == 10 and some["total_bytes_out"] == 20
    assert some["samples"][0] == {"ts": start, "bytes_in": 1, "bytes_out": 2}


def test_capability_gate_with_a_real_client(server, procs, tmp_path):
    """A client that does not declare traffic_quota (an older build): a PUT for it is 422 once it
    said hello. The shipped agent declares it (tests/e2e/test_quota_enforcement.py)."""
    add_user(server, "alice")
    _, token = enrolled_token(server, tmp_path, "edge-old")
    old = RawPeer(server.control_port)
    old.send({"type": "hello", "token": token, "protocol_version": 1, "client_version": "1.3.0-test",
              "capabilities": ["udp", "multi_target", "port_range"]})
    old.wait_for("welcome")
    wait_connected(server, "edge-old")
    add_grant(server, "alice", "edge-old")
    answer = call(server, "PUT", quota_path(client="edge-old"), {"monthly_bytes": MiB})
    assert answer[0] == 422 and error_code(answer) == "quota_unsupported_by_client", answer
    assert "edge-old" in answer[1]["error"]["message"]


def test_seed_004_runbook_with_the_curl_commands_as_written(server, tmp_path):
    curl = require_tool("curl")
    alice = add_user(server, "alice")
    peer = QuotaPeer(server, tmp_path, "edge-tokyo").connect()
    add_grant(server, "alice", "edge-tokyo")
    rule = peer.push_owned_rule(server, alice, {"client": "edge-tokyo", "listen_port": free_port(),
                                                "target": "127.0.0.1:9"})
    assert call(server, "PUT", quota_path(), {"monthly_bytes": 4 * MiB})[0] == 201
    peer.wait_update()

    # the client's cumulative counters pass the budget: the server marks the trip and pushes it
    peer.report(rule["rule_id"], 3 * MiB, 2 * MiB)
    tripped = peer.wait_update(lambda u: u["state"]["exhausted"])
    assert tripped["state"]["budget_remaining_bytes"] == 0
    server.proc.wait_event("traffic_quota.exhausted", pred=lambda e: e.get("user_id") == "alice")
    # the runbook's gauge, as /metrics spells it (no space after the comma)
    assert metric(scrape(server), 'portunus_traffic_quota_exhausted{user="alice",client="edge-tokyo"}') == 1

    base = server.api  # the runbook's https://portunus.example.com, on the test server's port
    env = {**os.environ, "PORTUNUS_API_TOKEN": OPERATOR_TOKEN}

    def sh(command: str) -> dict:
        out = subprocess.run(["sh", "-c", command.replace("https://portunus.example.com", base)], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    status = sh("""curl -sS \\
  -H 'Authorization: Bearer '"$PORTUNUS_API_TOKEN" \\
  https://portunus.example.com/v1/users/alice/quotas/edge-tokyo/status""")
    assert status["exhausted"] is True and status["exhausted_at"] is not None
    assert status["current_period_bytes_used"] == 5 * MiB

    cleared = sh("""curl -sS -X PATCH \\
      -H 'Authorization: Bearer '"$PORTUNUS_API_TOKEN" \\
      -H 'Content-Type: application/json' \\
      https://portunus.example.com/v1/users/alice/quotas/edge-tokyo \\
      -d '{"clear_period_usage": true}'""")
    assert cleared["exhausted"] is False and cleared["current_period_bytes_used"] == 0
    assert cleared["current_period_started_at"] == status["current_period_started_at"]
    resumed = peer.wait_update()
    assert resumed["action"] == "set" and resumed["state"]["exhausted"] is False
    assert resumed["state"]["budget_remaining_bytes"] == 4 * MiB

    # the handle ran dry on the client: it says so at once, the server marks it and pushes
    peer.send({"type": "traffic_quota_exhausted", "user_id": "alice", "client_id": peer.client_id,
               "at": time.time()})
    assert peer.wait_update(lambda u: u["state"]["exhausted"])["action"] == "set"
    text = scrape(server)
    assert metric(text, 'portunus_traffic_quota_exhausted_total{user="alice",client="edge-tokyo"}') == 2
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    raised = sh("""curl -sS -X PUT \\
      -H 'Authorization: Bearer '"$PORTUNUS_API_TOKEN" \\
      -H 'Content-Type: application/json' \\
      https://portunus.example.com/v1/users/alice/quotas/edge-tokyo \\
      -d '{"monthly_bytes": 2199023255552}'""")
    assert raised["exhausted"] is False and raised["monthly_bytes"] == 2199023255552
    assert peer.wait_update()["state"]["exhausted"] is False
    assert 'portunus_clients_connected{client="edge-tokyo"} 1' in scrape(server).splitlines()
    peer.close()


def test_offline_change_is_replayed_on_reconnect_before_the_rules(server, tmp_path):
    alice = add_user(server, "alice")
    peer = QuotaPeer(server, tmp_path, "edge-osaka").connect()
    add_grant(server, "alice", "edge-osaka")
    rule = peer.push_owned_rule(server, alice, {"client": "edge-osaka", "listen_port": free_port(),
                                                "target": "127.0.0.1:9"})
    peer.close()
    wait_connected(server, "edge-osaka", connected=False)
    assert 'portunus_clients_connected{client="edge-osaka"} 0' in scrape(server).splitlines()

    assert call(server, "PUT", quota_path(client="edge-osaka"), {"monthly_bytes": 0})[0] == 201
    peer.connect()
    replay = [msg["type"] for msg in peer.replays[-1] if msg["type"] != "ping"]
    assert replay == ["traffic_quota_update", "rule_update", "replay_done"], replay
    first = peer.replays[-1][0]
    assert first["user_id"] == "alice" and first["state"]["exhausted"] is True
    assert peer.replays[-1][1]["rule_id"] == rule["rule_id"]
    peer.close()

    wait_connected(server, "edge-osaka", connected=False)
    assert call(server, "DELETE", quota_path(client="edge-osaka"))[0] == 200
    peer.connect()
    update = [msg for msg in peer.replays[-1] if msg["type"] == "traffic_quota_update"]
    assert [(u["action"], u["user_id"]) for u in update] == [("remove", "alice")]  # deleted while offline
    peer.close()


def test_real_bytes_through_a_real_client_are_accounted_and_survive_a_restart(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data, control_listen=f"127.0.0.1:{free_port()}")  # the client redials the same port
    server = Server(procs, data)
    alice = add_user(server, "alice")
    client_id, _ = enrolled_token(server, tmp_path, "edge-tokyo")
    add_grant(server, "alice", "edge-tokyo")
    # before the client's first hello the capability is unknown, so the quota is accepted
    assert call(server, "PUT", quota_path(), {"monthly_bytes": 1 << 40})[0] == 201
    bundle = tmp_path / "edge-tokyo.raw.bundle.json"
    agent = procs(portunus_cmd("client") + ["--bundle", str(bundle), "--reconnect-initial-delay-ms", "100",
                                            "--reconnect-max-delay-secs", "1", "--stats-report-interval-secs", "1"])
    agent.wait_event("control.connected", timeout=20)
    listen, target = free_port(), free_port()
    echo = TcpEchoServer([target])
    try:
        status, rule = call(server, "POST", "/v1/rules", {"client": "edge-tokyo", "listen_port": listen,
                                                         "target": f"127.0.0.1:{target}"}, token=alice)
        assert status == 201 and rule["owner"] == "alice", rule
        payload = os.urandom(MiB)
        assert roundtrip(listen, payload) == payload

        def used():
            view = call(server, "GET", quota_path() + "/status", token=alice)[1]
            return view if view["current_period_bytes_used"] >= 2 * MiB else None
        view = wait_until(used, timeout=20, interval=0.3, what="usage from stats reports")
        assert view["current_period_bytes_used"] == 2 * MiB  # in + out, counted once across reports
        assert view["last_report_at"] is not None and view["budget_remaining_bytes"] == (1 << 40) - 2 * MiB
        history = call(server, "GET", "/v1/users/alice/traffic", token=alice)[1]
        assert history["bucket"] == "1m" and history["total_bytes_in"] == MiB and history["total_bytes_out"] == MiB
        assert history["samples"] and all(set(s) == {"ts", "bytes_in", "bytes_out"} for s in history["samples"])
        by_client = call(server, "GET", f"/v1/clients/{client_id}/traffic")[1]
        assert by_client["total_bytes_in"] == MiB
        assert call(server, "GET", "/v1/traffic/global?user_id=alice")[1]["total_bytes_out"] == MiB
        assert metric(scrape(server), 'portunus_traffic_quota_bytes_used{user="alice",client="edge-tokyo"}') == 2 * MiB

        server.proc.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        again = Server(procs, server.data_dir)
        kept = call(again, "GET", quota_path() + "/status")[1]
        assert kept["current_period_bytes_used"] == 2 * MiB
        # the client reconnects and keeps reporting its cumulative counters: nothing is counted twice
        agent.wait_event("control.connected", timeout=20, pred=lambda e: len(agent.events("control.connected")) > 1)
        assert roundtrip(listen, payload[:1000]) == payload[:1000]
        wait_until(lambda: call(again, "GET", quota_path() + "/status")[1]["current_period_bytes_used"]
                   == 2 * MiB + 2000, timeout=20, interval=0.3, what="usage after the restart")
    finally:
        echo.close()
