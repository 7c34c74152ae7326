"""Owner caps and a rule's caps over the real API (SPEC §2.9, §3.4, §6; issue 13 points 4-5): the
owner-cap routes' shapes, errors and access, the owner_rate_limit_update pushes a raw control peer
sees, the capability gate, PUT rules/{id} {rate_limit} as a hot update, the cap dropped with its
owner's last rule, and the replay of owner caps before the rules after a server restart."""

from __future__ import annotations

import signal
import threading

import pytest

from cp import Server, write_server_toml
from conftest import wait_until
from quota_env import QuotaPeer, add_grant, add_user, call, error_code, metric, scrape
from rawpeer import RawPeer

CAP_CAPS = ["udp", "multi_target", "port_range", "rate_limit"]
NO_RATE_LIMIT = ["udp", "multi_target", "port_range"]


class CapPeer(QuotaPeer):
    """A raw enrolled client declaring ``caps``; records owner_rate_limit_update messages too."""

    def __init__(self, server: Server, tmp_path, name: str, caps=CAP_CAPS):
        super().__init__(server, tmp_path, name)
        self.caps = caps

    def connect(self) -> "CapPeer":
        RawPeer.__init__(self, self.port)
        self.send({"type": "hello", "token": self.token, "protocol_version": 1, "client_version": "1.4.0-test",
                   "capabilities": self.caps})
        self.wait_for("welcome")
        seen = []
        while True:
            msg = self.next()
            seen.append(msg)
            if msg["type"] == "replay_done":
                break
        self.replays.append(seen)
        return self

    def wait_type(self, mtype: str, pred=lambda msg: True, timeout: float = 10.0) -> dict:
        while True:
            msg = self.next(timeout)
            if msg.get("type") == mtype and pred(msg):
                return msg


@pytest.fixture
def server(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    return Server(procs, data)


def cap_path(client="edge-tokyo", owner="alice") -> str:
    return f"/v1/clients/{client}/owners/{owner}/rate-limit"


def answered(peer: CapPeer, fn, state="active"):
    """Run ``fn`` (an API call that pushes a rule) and answer the push as an agent would."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("answer", fn()), daemon=True)
    t.start()
    push = peer.wait_type("rule_update", lambda msg: msg["action"] == "push")
    peer.send({"type": "rule_status", "rule_id": push["rule_id"], "state": state,
               "request_id": push.get("request_id")})
    t.join(20)
    return push, out["answer"]


def test_owner_cap_routes_shapes_errors_pushes_and_access(server, tmp_path):
    alice = add_user(server, "alice")
    add_user(server, "bob")
    peer = CapPeer(server, tmp_path, "edge-tokyo").connect()
    add_grant(server, "alice", "edge-tokyo")
    rule = peer.push_owned_rule(server, alice, {"client": "edge-tokyo", "listen_port": 20001,
                                                "target": "127.0.0.1:9"})

    assert call(server, "GET", "/v1/clients/edge-tokyo/owners") == \
        (200, {"owners": [{"owner_id": "alice", "has_rate_limit": False, "rule_count": 1}]})
    status, view = call(server, "GET", cap_path())
    assert status == 200 and view == {"client_id": peer.client_id, "owner_id": "alice", "rate_limit": None,
                                      "updated_at": None}

    for body, code in (({}, "validation.rate_limit_no_caps_provided"),
                       ({"rate_limit": {}}, "validation.rate_limit_no_caps_provided"),
                       ({"rate_limit": {"bandwidth_in_bps": 0}}, "validation.rate_limit_cap_zero"),
                       ({"rate_limit": {"bandwidth_in_burst": 10}}, "validation.rate_limit_burst_without_rate"),
                       ({"rate_limit": {"bandwidth_in_bps": 1000, "bandwidth_in_burst": 1}},
                        "validation.rate_limit_burst_range"),
                       ({"rate_limit": {"bandwidth_in_bps": "10M"}}, "validation.rate_limit_invalid"),
                       ({"rate_limit": {"bandwidth_in_bps": 1}, "extra": 1}, "validation.unknown_field")):
        answer = call(server, "PUT", cap_path(), body)
        assert answer[0] == 400 and error_code(answer) == code, (body, answer)
    for path in (cap_path(owner="bob"), cap_path(owner="nobody"), cap_path(client="no-such-client")):
        answer = call(server, "PUT", path, {"rate_limit": {"bandwidth_in_bps": 1000}})
        assert answer[0] == 404 and error_code(answer) == "not_found", (path, answer)
        assert call(server, "GET", path)[0] == 404

    caps = {"bandwidth_in_bps": 1_000_000, "concurrent_connections": 10}
    status, view = call(server, "PUT", cap_path(client=peer.client_id), {"rate_limit": caps})
    assert status == 200 and view["rate_limit"] == caps and view["updated_at"]
    push = peer.wait_type("owner_rate_limit_update")
    assert push == {"type": "owner_rate_limit_update", "client_id": peer.client_id, "owner_id": "alice",
                    "action": "set", "rate_limit": caps}
    assert call(server, "GET", cap_path())[1]["rate_limit"] == caps
    assert call(server, "GET", "/v1/clients/edge-tokyo/owners")[1]["owners"][0]["has_rate_limit"] is True

    # superadmin only, even for the owner herself
    for method, body in (("GET", None), ("PUT", {"rate_limit": caps}), ("DELETE", None)):
        answer = call(server, method, cap_path(), body, token=alice)
        assert answer[0] == 403 and error_code(answer) == "role_required", (method, answer)
    assert error_code(call(server, "GET", "/v1/clients/edge-tokyo/owners", token=alice)) == "role_required"

    status, gone = call(server, "DELETE", cap_path())
    assert status == 200 and gone["removed"] is True and gone["owner_cap"]["rate_limit"] == caps
    assert peer.wait_type("owner_rate_limit_update")["action"] == "remove"
    assert error_code(call(server, "DELETE", cap_path())) == "not_found"

    # the owner's last rule on the client takes the cap with it
    call(server, "PUT", cap_path(), {"rate_limit": caps})
    assert peer.wait_type("owner_rate_limit_update")["action"] == "set"
    assert call(server, "DELETE", f"/v1/rules/{rule['rule_id']}")[0] == 200
    peer.wait_type("rule_update", lambda msg: msg["action"] == "remove")
    removed = peer.wait_type("owner_rate_limit_update")
    assert (removed["owner_id"], removed["action"]) == ("alice", "remove")
    assert call(server, "GET", "/v1/clients/edge-tokyo/owners") == (200, {"owners": []})
    assert call(server, "GET", cap_path())[0] == 404


def test_capability_gate_for_owner_caps_and_rule_caps(server, tmp_path):
    alice = add_user(server, "alice")
    old = CapPeer(server, tmp_path, "edge-old", caps=NO_RATE_LIMIT).connect()
    add_grant(server, "alice", "edge-old")
    rule = old.push_owned_rule(server, alice, {"client": "edge-old", "listen_port": 20002,
                                               "target": "127.0.0.1:9"})
    answer = call(server, "PUT", cap_path("edge-old"), {"rate_limit": {"new_connections_per_sec": 5}})
    assert answer[0] == 422 and error_code(answer) == "rate_limit_unsupported_by_client", answer
    answer = call(server, "PUT", f"/v1/rules/{rule['rule_id']}", {"rate_limit": {"new_connections_per_sec": 5}})
    assert answer[0] == 422 and error_code(answer) == "rate_limit_unsupported_by_client", answer
    answer = call(server, "POST", "/v1/rules", {"client": "edge-old", "listen_port": 20003,
                                                "target": "127.0.0.1:9", "rate_limit": {"bandwidth_in_bps": 10}})
    assert answer[0] == 422 and error_code(answer) == "rate_limit_unsupported_by_client", answer
    # uncapping is always allowed (nothing for the client to enforce)
    assert call(server, "PUT", f"/v1/rules/{rule['rule_id']}", {"rate_limit": None})[0] == 200
    assert call(server, "GET", f"/v1/rules/{rule['rule_id']}")[1]["rate_limit"] is None


def test_put_rule_rate_limit_is_a_hot_update_for_owner_or_superadmin(server, tmp_path):
    alice, bob = add_user(server, "alice"), add_user(server, "bob")
    peer = CapPeer(server, tmp_path, "edge-tokyo").connect()
    add_grant(server, "alice", "edge-tokyo")
    rule = peer.push_owned_rule(server, alice, {"client": "edge-tokyo", "listen_port": 20004,
                                                "target": "127.0.0.1:9"})
    path = f"/v1/rules/{rule['rule_id']}"

    for body, code in (({}, "validation.missing_field"), ({"rate_limit": {}}, "validation.rate_limit_no_caps_provided"),
                       ({"rate_limit": {"concurrent_connections": 0}}, "validation.rate_limit_cap_zero"),
                       ({"rate_limit": {"new_connections_burst": 3}}, "validation.rate_limit_burst_without_rate"),
                       ({"rate_limit": {"new_connections_per_sec": 10, "new_connections_burst": 601}},
                        "validation.rate_limit_burst_range"),
                       ({"rate_limit": None, "listen_port": 1}, "validation.unknown_field"),
                       ([1], "bad_request")):
        answer = call(server, "PUT", path, body)
        assert answer[0] == 400 and error_code(answer) == code, (body, answer)
    answer = call(server, "PUT", path, {"rate_limit": {"bandwidth_in_bps": 5}}, token=bob)
    assert answer[0] == 403 and error_code(answer) == "not_owner"
    assert call(server, "PUT", "/v1/rules/01HZZZZZZZZZZZZZZZZZZZZZZZ", {"rate_limit": None})[0] == 404

    caps = {"bandwidth_in_bps": 2_000_000, "bandwidth_in_burst": 4_000_000}
    push, (status, view) = answered(peer, lambda: call(server, "PUT", path, {"rate_limit": caps}, token=alice))
    assert status == 200 and view["rate_limit"] == caps and view["client_notified"] is True
    assert push["rule_id"] == rule["rule_id"] and push["rule"]["rate_limit"] == caps
    assert push["rule"]["listen_port"] == 20004 and push["rule"]["owner"] == "alice"
    got = call(server, "GET", path)[1]
    assert got["rate_limit"] == caps and got["owner"] == "alice" and got["state"] == "active"
    assert got["listen_port"] == 20004

    push, (status, view) = answered(peer, lambda: call(server, "PUT", path, {"rate_limit": None}))
    assert status == 200 and view["rate_limit"] is None and push["rule"]["rate_limit"] is None

    # offline: the spec is stored and replayed on the next connection
    peer.close()
    status, view = call(server, "PUT", path, {"rate_limit": {"concurrent_connections": 3}})
    assert status == 200 and view["client_notified"] is False
    peer.connect()
    replayed = [m for m in peer.replays[-1] if m["type"] == "rule_update"]
    assert replayed[0]["rule"]["rate_limit"] == {"concurrent_connections": 3}


def test_openapi_describes_the_cap_routes(server):
    paths = call(server, "GET", "/v1/openapi.json")[1]["paths"]
    assert paths["/v1/clients/{id}/owners"]["get"]["x-portunus-access"] == "superadmin"
    assert set(paths["/v1/clients/{id}/owners/{owner}/rate-limit"]) == {"get", "put", "delete"}
    assert paths["/v1/rules/{id}"]["put"]["x-portunus-access"] == "owner"


def test_owner_caps_are_replayed_before_quotas_and_rules_after_a_restart(procs, tmp_path):
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(procs, data)
    alice = add_user(server, "alice")
    peer = CapPeer(server, tmp_path, "edge-tokyo", caps=CAP_CAPS + ["traffic_quota"]).connect()
    add_grant(server, "alice", "edge-tokyo")
    for port in (20005, 20006):
        peer.push_owned_rule(server, alice, {"client": "edge-tokyo", "listen_port": port, "target": "127.0.0.1:9"})
    caps = {"new_connections_per_sec": 20, "new_connections_burst": 40}
    assert call(server, "PUT", cap_path(), {"rate_limit": caps})[0] == 200
    peer.wait_type("owner_rate_limit_update")
    assert call(server, "PUT", "/v1/users/alice/quotas/edge-tokyo", {"monthly_bytes": 1 << 30})[0] == 201
    peer.wait_type("traffic_quota_update")

    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    peer.close()
    again = Server(procs, data)
    peer.port = again.control_port
    peer.connect()
    kinds = [m["type"] for m in peer.replays[-1]]
    first_rule = kinds.index("rule_update")
    assert kinds.index("owner_rate_limit_update") < kinds.index("traffic_quota_update") < first_rule, kinds
    cap_msgs = [m for m in peer.replays[-1] if m["type"] == "owner_rate_limit_update"]
    assert cap_msgs == [{"type": "owner_rate_limit_update", "client_id": peer.client_id, "owner_id": "alice",
                         "action": "set", "rate_limit": caps}]
    assert kinds.count("rule_update") == 2 and kinds[-1] == "replay_done"


@pytest.mark.parametrize("rate_limit,code", [
    ({"bandwidth_out_bps": 0}, "validation.rate_limit_cap_zero"),
    ({"bandwidth_out_burst": 100}, "validation.rate_limit_burst_without_rate"),
    ({"bandwidth_out_bps": 100, "bandwidth_out_burst": 6001}, "validation.rate_limit_burst_range"),
    ({}, "validation.rate_limit_no_caps_provided"),
    ({"bandwidth_out_bps": -5}, "validation.rate_limit_invalid"),
    ({"bandwidth": 5}, "validation.unknown_field"),
])
def test_post_rules_validates_rate_limit_before_anything_is_stored(server, tmp_path, rate_limit, code):
    CapPeer(server, tmp_path, "edge-tokyo").connect()
    answer = call(server, "POST", "/v1/rules", {"client": "edge-tokyo", "listen_port": 20031,
                                                "target": "127.0.0.1:9", "rate_limit": rate_limit})
    assert answer[0] == 400 and error_code(answer) == code, answer
    assert call(server, "GET", "/v1/rules")[1]["rules"] == []


def test_reported_rate_limit_counters_reach_metrics_and_rule_stats(server, tmp_path):
    alice = add_user(server, "alice")
    peer = CapPeer(server, tmp_path, "edge-tokyo").connect()
    add_grant(server, "alice", "edge-tokyo")
    rule = peer.push_owned_rule(server, alice, {"client": "edge-tokyo", "listen_port": 20041,
                                                "target": "127.0.0.1:9",
                                                "rate_limit": {"concurrent_connections": 2}})
    limiter = {"rejects": {"conn_concurrent": 4}, "throttle_seconds": {"in": 0.5, "out": 0},
               "active": 2, "bandwidth_dropped_in": 0, "bandwidth_dropped_out": 0}
    owners = [{"owner": "alice", "active": 2, "throttle_seconds": {"in": 1.25, "out": 0},
               "bandwidth_dropped_in": 0, "bandwidth_dropped_out": 0}]
    peer.send({"type": "stats_report", "at": 1.0, "owners": owners,
               "rules": [{"rule_id": rule["rule_id"], "bytes_in": 1, "rate_limit": limiter}]})
    labels = f'client="edge-tokyo",rule="{rule["rule_id"]}",owner="alice"'

    def scraped():
        text = scrape(server)
        return text if metric(text, f'portunus_rate_limit_reject_total{{{labels},reason="conn_concurrent"}}') == 4 \
            else None
    text = wait_until(scraped, timeout=10, interval=0.2, what="rate-limit rows")
    assert metric(text, f'portunus_rate_limit_throttle_seconds_total{{{labels},direction="in"}}') == 0.5
    assert metric(text, f'portunus_rate_limit_active_connections{{{labels}}}') == 2
    owner_row = 'client="edge-tokyo",rule="",owner="alice"'
    assert metric(text, f'portunus_rate_limit_throttle_seconds_total{{{owner_row},direction="in"}}') == 1.25
    assert metric(text, f'portunus_rate_limit_active_connections{{{owner_row}}}') == 2
    stats = call(server, "GET", f"/v1/rules/{rule['rule_id']}/stats")[1]
    assert stats["rate_limit_stats"]["rejects"]["conn_concurrent"] == 4 and stats["rate_limit_stats"]["active"] == 2

    # a row about another owner is refused (and counted), the rule counters still count
    peer.send({"type": "stats_report", "at": 2.0, "owners": [{"owner": "mallory", "active": 9}],
               "rules": [{"rule_id": rule["rule_id"], "bytes_in": 2, "rate_limit": limiter}]})
    wait_until(lambda: (metric(scrape(server), 'portunus_control_rejected_messages_total{reason="stats_unknown_rule"}')
                        or 0) >= 1, timeout=10, interval=0.2, what="the refused owner row")
    assert 'owner="mallory"' not in scrape(server)
