"""RBAC at the seam with real processes (SPEC §5, issue 10 acceptance): a fresh server, onboarding, two
tenants with grants on different clients; pushes inside and outside a grant (the three 403 codes in
their order), tenants blind to each other's rules (by id, in lists, in stats and the SSE stream) and
to clients no grant covers, role_required on every admin route, one audit row per decision with the
actor, dependent rules removed from the client when the user goes; the CLI against the routes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import free_port_block, portunus_cmd, wait_until
from cp import OPERATOR_TOKEN, Server, enroll_client, wait_connected, write_server_toml
from identity_env import fresh_server, onboard, secrets  # noqa: F401 - the fixture
from webapi import Web, bearer, call

ALICE_PW = "alice password 0001"
BOB_PW = "bob password 000001"


def enroll(web: Web, procs, tmp_path, name: str):
    """Enroll a client through the API as the logged-in superadmin and start its agent."""
    ans = web.request("POST", "/v1/client-enrollments", {"name": name})
    assert ans.status == 201, ans.body
    bundle = tmp_path / f"{name}.bundle.json"
    out = subprocess.run(portunus_cmd("client") + ["enroll", ans.body["enrollment_uri"], "--out", str(bundle)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    agent = procs(portunus_cmd("client") + ["--bundle", str(bundle), "--reconnect-initial-delay-ms", "100",
                                            "--reconnect-max-delay-secs", "1", "--shutdown-drain-timeout-secs", "2"])
    agent.wait_event("control.connected", timeout=20)
    return ans.body["client"]["client_id"], agent


def wait_online(web: Web, client_id: str):
    def online():
        clients = web.get("/v1/clients").body["clients"]
        return any(c["client_id"] == client_id and c["connected"] for c in clients)
    wait_until(online, timeout=20, interval=0.1, what=f"{client_id} connected")


@pytest.fixture
def world(secrets, tmp_path):  # noqa: F811 - the fixture imported above
    server = fresh_server(secrets.track, tmp_path / "server")
    closed = call(server.api, "GET", "/v1/rules")
    assert (closed.status, closed.code) == (503, "bootstrap_required")
    admin = onboard(server, secrets)
    edge1, agent1 = enroll(admin, secrets.track, tmp_path, "edge-01")
    edge2, _ = enroll(admin, secrets.track, tmp_path, "edge-02")
    wait_online(admin, edge1)
    wait_online(admin, edge2)
    base = free_port_block(12)
    users = {}
    for user_id, password, client in (("alice", ALICE_PW, edge1), ("bob", BOB_PW, edge2)):
        secrets.add(password)
        assert admin.request("POST", "/v1/users", {"user_id": user_id, "display_name": user_id.title(),
                                                   "role": "user", "password": password}).status == 201
        grant = admin.request("POST", "/v1/grants", {"user_id": user_id, "client": client,
                                                     "listen_port_start": base, "listen_port_end": base + 10,
                                                     "protocols": ["tcp"]})
        assert grant.status == 201, grant.body
        web = Web(server.api)
        assert web.login(user_id, password).status == 200
        secrets.add(web.cookie)
        users[user_id] = web
    return {"server": server, "admin": admin, "alice": users["alice"], "bob": users["bob"], "edge1": edge1,
            "edge2": edge2, "base": base, "agent1": agent1}


def push(web: Web, client: str, port: int, protocol: str = "tcp", end: int | None = None):
    body = {"client": client, "protocol": protocol, "target": "127.0.0.1:9"}
    if end is None:
        body["listen_port"] = port
    else:
        body["listen"] = f"{port}-{end}"
        body["target"] = f"127.0.0.1:{port}-{end}"
    return web.request("POST", "/v1/rules", body)


def test_tenants_push_inside_their_grant_and_see_only_their_own(world):
    alice, bob, admin, base = world["alice"], world["bob"], world["admin"], world["base"]
    pushed = push(alice, world["edge1"], base + 5)
    assert pushed.status == 201, pushed.body
    rule = pushed.body
    assert rule["owner"] == "alice" and rule["state"] == "active"
    # outside the grant: the three codes, in their order
    outside = push(alice, world["edge2"], base + 5, protocol="udp")
    assert (outside.status, outside.code) == (403, "client_not_granted")  # client first, even with udp
    assert push(alice, world["edge1"], base + 5, protocol="udp").code == "protocol_not_granted"
    assert push(alice, world["edge1"], base + 11).code == "port_outside_grant"
    assert push(alice, world["edge1"], base + 9, end=base + 11).code == "port_outside_grant"
    # an owner field in the body is not how you become someone else
    forged = alice.request("POST", "/v1/rules", {"client": world["edge1"], "listen_port": base + 6,
                                                 "target": "127.0.0.1:9", "owner": "bob"})
    assert forged.status == 400
    # alice sees her rule and her client only
    assert [r["rule_id"] for r in alice.get("/v1/rules").body["rules"]] == [rule["rule_id"]]
    assert [c["client_id"] for c in alice.get("/v1/clients").body["clients"]] == [world["edge1"]]
    assert alice.get(f"/v1/rules/{rule['rule_id']}").status == 200
    assert alice.get(f"/v1/rules/{rule['rule_id']}/stats").status == 200
    # bob: not in his lists, 403 not_owner by id (read, stats, stream, remove), and blind to edge-01
    rid = rule["rule_id"]
    assert bob.get("/v1/rules").body["rules"] == []
    assert bob.get("/v1/rules?owner=alice").body["rules"] == []
    assert bob.get(f"/v1/rules?client={world['edge1']}").body["rules"] == []
    for method, path in (("GET", f"/v1/rules/{rid}"), ("GET", f"/v1/rules/{rid}/stats"),
                         ("GET", f"/v1/rules/{rid}/stats?per_port=true"), ("GET", f"/v1/rules/{rid}/stats/stream"),
                         ("DELETE", f"/v1/rules/{rid}")):
        ans = bob.request(method, path)
        assert (ans.status, ans.code) == (403, "not_owner"), (method, path, ans.body)
    assert [c["client_id"] for c in bob.get("/v1/clients").body["clients"]] == [world["edge2"]]
    assert bob.get(f"/v1/clients/{world['edge1']}").status == 404
    assert bob.get("/v1/clients/edge-01").status == 404
    # the superadmin sees everything; the rule is still there after bob's attempts
    assert [r["rule_id"] for r in admin.get("/v1/rules?owner=alice").body["rules"]] == [rid]
    assert admin.get(f"/v1/rules/{rid}").body["owner"] == "alice"
    # every decision is one audit row with the actor
    entries = admin.get("/v1/audit?limit=200").body["entries"]
    denials = {(e["actor"], e["reason"]) for e in entries if e["outcome"] == "deny"}
    assert {("alice", "client_not_granted"), ("alice", "protocol_not_granted"), ("alice", "port_outside_grant"),
            ("bob", "not_owner")} <= denials
    assert any(e["actor"] == "alice" and e["outcome"] == "allow" and e["method"] == "POST"
               and e["path"] == "/v1/rules" for e in entries)
    # alice removes her own rule
    assert alice.request("DELETE", f"/v1/rules/{rid}").status == 200


def test_a_tenant_gets_role_required_on_every_admin_route(world):
    bob, edge = world["bob"], world["edge2"]
    admin_routes = [
        ("POST", "/v1/client-enrollments", {"name": "x"}), ("PUT", f"/v1/clients/{edge}", {"address": None}),
        ("PATCH", f"/v1/clients/{edge}/name", {"name": "y"}), ("POST", f"/v1/clients/{edge}/enrollment", {}),
        ("POST", f"/v1/clients/{edge}/revoke", None), ("DELETE", f"/v1/clients/{edge}", None),
        ("POST", "/v1/users", {"user_id": "eve", "display_name": "Eve", "role": "superadmin",
                               "password": "eve password 000001"}),
        ("GET", "/v1/users", None), ("GET", "/v1/users/alice", None), ("DELETE", "/v1/users/alice", None),
        ("POST", "/v1/users/alice/password", {}), ("POST", "/v1/grants", {}), ("GET", "/v1/grants", None),
        ("DELETE", "/v1/grants/01ARZ3NDEKTSV4RRFFQ69G5FAV", None), ("GET", "/v1/settings/advertised-endpoint", None),
        ("PUT", "/v1/settings/advertised-endpoint", {"override": None}), ("GET", "/v1/audit", None),
        ("GET", "/v1/metrics", None)]
    for method, path, body in admin_routes:
        ans = bob.request(method, path, body)
        assert (ans.status, ans.code) == (403, "role_required"), (method, path, ans.body)
    # none of it happened
    admin = world["admin"]
    assert admin.get("/v1/users/eve").status == 404
    assert admin.get(f"/v1/clients/{edge}").body["revoked"] is False


def test_removing_a_user_removes_their_rules_from_the_client(world):
    alice, admin, base = world["alice"], world["admin"], world["base"]
    rid = push(alice, world["edge1"], base + 1).body["rule_id"]
    removed = admin.request("DELETE", "/v1/users/alice")
    assert removed.status == 200 and removed.body == {"removed_rule_ids": [rid]}
    world["agent1"].wait_event("rule.removed", timeout=15, pred=lambda e: e.get("rule") == rid)
    assert admin.get(f"/v1/rules/{rid}").status == 404
    assert alice.get("/v1/rules").code == "unauthenticated"  # her session went with her


def test_revoking_a_grant_removes_the_rules_it_no_longer_covers(world):
    alice, admin, base = world["alice"], world["admin"], world["base"]
    rid = push(alice, world["edge1"], base + 2).body["rule_id"]
    grants = admin.get("/v1/grants?user_id=alice").body["grants"]
    revoked = admin.request("DELETE", f"/v1/grants/{grants[0]['grant_id']}")
    assert revoked.body == {"removed_rule_ids": [rid]}
    world["agent1"].wait_event("rule.removed", timeout=15, pred=lambda e: e.get("rule") == rid)
    assert push(alice, world["edge1"], base + 2).code == "client_not_granted"
    assert alice.get("/v1/clients").body["clients"] == []


# ------------------------------------------------------------------ the CLI against the routes

def cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PORTUNUS_SERVER",)}
    env.update({"PORTUNUS_ALLOW_ANY_FS": "1", "PORTUNUS_OPERATOR_TOKEN": OPERATOR_TOKEN, **extra})
    return env


def test_identity_cli_commands_go_through_the_running_server(procs, tmp_path, secrets):  # noqa: F811
    data = tmp_path / "server"
    write_server_toml(data)
    server = Server(secrets.track, data)
    agent, _ = enroll_client(server, secrets.track, tmp_path, "edge-01")
    wait_connected(server, "edge-01")

    def run(*args, stdin="", **env):
        return subprocess.run(portunus_cmd("server") + ["--data-dir", str(data), *args], input=stdin,
                              capture_output=True, text=True, env=cli_env(**env), timeout=60)
    secrets.add(ALICE_PW, OPERATOR_TOKEN)
    res = run("user-add", "alice", "--display-name", "Alice", "--password-stdin", stdin=ALICE_PW + "\n")
    assert res.returncode == 0, res.stderr
    assert "created user alice" in res.stdout
    assert run("user-add", "alice", "--display-name", "A", "--password-stdin", stdin=ALICE_PW).returncode == 9
    users = json.loads(run("user-list", "--format", "json").stdout)
    assert "alice" in {u["user_id"] for u in users}
    assert json.loads(run("user-get", "alice", "--format", "json").stdout)["role"] == "user"
    assert run("user-get", "nobody").returncode == 8
    base = free_port_block(4)
    res = run("grant-add", "--user-id", "alice", "--client", "edge-01", "--listen-port-start", str(base),
              "--listen-port-end", str(base + 3), "--protocols", "tcp")
    assert res.returncode == 0, res.stderr
    grant_id = res.stdout.strip()
    grants = json.loads(run("grant-list", "--user-id", "alice", "--format", "json").stdout)
    assert [g["grant_id"] for g in grants] == [grant_id]
    # alice pushes with her session; the CLI's revoke removes it from the running client
    alice = Web(server.api)
    assert alice.login("alice", ALICE_PW).status == 200
    secrets.add(alice.cookie)
    rid = push(alice, "edge-01", base + 1).body["rule_id"]
    res = run("grant-revoke", grant_id, "--format", "json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"removed_rule_ids": [rid]}
    agent.wait_event("rule.removed", timeout=15, pred=lambda e: e.get("rule") == rid)
    # the API password reset from the CLI: a temporary password, alice's session ends, change required
    res = run("reset-password", "alice", "--temporary", "--online")
    assert res.returncode == 0, res.stderr
    temporary = res.stdout.split("temporary_password=", 1)[1].split()[0]
    secrets.add(temporary)
    assert alice.get("/v1/users/me").code == "unauthenticated"
    assert Web(server.api).login("alice", temporary).body["password_change_required"] is True
    assert run("reset-password", "nobody", "--temporary", "--online").returncode == 8
    assert run("user-remove", "alice").returncode == 0
    assert run("user-get", "alice").returncode == 8
    # a wrong bearer is exit 7
    bad = run("user-list", PORTUNUS_OPERATOR_TOKEN="not-the-token-000000000000000000000000000")
    assert bad.returncode == 7 and "error: unauthenticated:" in bad.stderr
    assert bearer(server.api, OPERATOR_TOKEN, "GET", "/v1/users/alice").status == 404
