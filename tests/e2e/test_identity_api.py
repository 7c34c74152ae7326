"""Identity over HTTP with a real `serve` (SPEC §5, §6): onboarding from the printed setup token, login
and the session cookie, CSRF on cookie writes, users and grants routes, the throttle surviving a
restart, offline reset-password then a change-only session, and bad input everywhere. Every secret
used is collected and the logs are checked for it at the end of each test."""

from __future__ import annotations

import json
import signal
import sqlite3

import pytest

from cp import Server, write_server_toml
from identity_env import ADMIN_PW, fresh_server, offline, onboard, restart, secrets  # noqa: F401 - fixture
from webapi import Web, bearer, call, setup_token

ALICE_PW = "alice password 0001"
USER_KEYS = {"user_id", "display_name", "role", "disabled", "password_change_required", "created_at"}


@pytest.fixture
def server(secrets, tmp_path):  # noqa: F811 - the fixture imported above
    return fresh_server(secrets.track, tmp_path / "server")


# ------------------------------------------------------------------ onboarding

def test_fresh_server_is_closed_until_onboarding(server, secrets):
    token = setup_token(server.proc)
    secrets.add(token)
    assert len(token) >= 43
    status = call(server.api, "GET", "/v1/auth/status")
    assert status.status == 200
    assert status.body["bootstrap_required"] is True and status.body["authenticated"] is False
    assert status.body["user"] is None
    for method, path in (("GET", "/v1/clients"), ("GET", "/v1/rules"), ("GET", "/v1/users"), ("GET", "/v1/users/me"),
                         ("POST", "/v1/grants")):
        ans = call(server.api, method, path, {} if method == "POST" else None)
        assert (ans.status, ans.code) == (503, "bootstrap_required"), (method, path, ans.body)
    # setup token: missing, wrong, then right
    body = {"user_id": "admin", "display_name": "Admin", "password": ADMIN_PW}
    secrets.add(ADMIN_PW)
    ans = call(server.api, "POST", "/v1/auth/onboarding", body)
    assert (ans.status, ans.code) == (401, "setup_token_required")
    ans = call(server.api, "POST", "/v1/auth/onboarding", {**body, "setup_token": "x" * 43})
    assert (ans.status, ans.code) == (401, "setup_token_invalid")
    assert "x" * 43 not in json.dumps(ans.body)
    ans = call(server.api, "POST", "/v1/auth/onboarding", {**body, "setup_token": token, "password": "short"})
    assert (ans.status, ans.code) == (422, "password_too_short")
    ans = call(server.api, "POST", "/v1/auth/onboarding", {**body, "setup_token": token})
    assert ans.status == 201 and set(ans.body["user"]) == USER_KEYS and ans.body["user"]["role"] == "superadmin"
    # a second onboarding, even with the same token, is refused for good
    ans = call(server.api, "POST", "/v1/auth/onboarding", {**body, "user_id": "admin2", "setup_token": token})
    assert (ans.status, ans.code) == (409, "already_bootstrapped")
    assert call(server.api, "GET", "/v1/auth/status").body["bootstrap_required"] is False
    # the API is open now (with credentials)
    assert call(server.api, "GET", "/v1/clients").code == "unauthenticated"


def test_the_setup_token_rotates_at_every_start_and_the_old_one_dies(procs, server, secrets):
    first = setup_token(server.proc)
    again = restart(secrets.track, server)
    second = setup_token(again.proc)
    secrets.add(first, second, ADMIN_PW)
    assert first != second
    body = {"user_id": "admin", "display_name": "Admin", "password": ADMIN_PW}
    assert call(again.api, "POST", "/v1/auth/onboarding", {**body, "setup_token": first}).code == "setup_token_invalid"
    assert call(again.api, "POST", "/v1/auth/onboarding", {**body, "setup_token": second}).status == 201
    # after onboarding, a start prints no token
    third = restart(secrets.track, again)
    assert not [l for l in third.proc.lines if l.startswith("Portunus onboarding setup token")]


def test_an_expired_setup_token_is_invalid(server, secrets):
    token = setup_token(server.proc)
    secrets.add(token, ADMIN_PW)
    # age the stored token past its 30 minutes instead of waiting for it (WAL lets us write beside serve)
    conn = sqlite3.connect(server.data_dir / "state.db", timeout=10)
    with conn:
        conn.execute("UPDATE onboarding_setup SET expires_at = '2000-01-01T00:00:00Z'")
    conn.close()
    ans = call(server.api, "POST", "/v1/auth/onboarding", {"setup_token": token, "user_id": "admin",
                                                           "display_name": "Admin", "password": ADMIN_PW})
    assert (ans.status, ans.code) == (401, "setup_token_invalid") and "expired" in ans.body["error"]["message"]
    assert call(server.api, "GET", "/v1/auth/status").body["bootstrap_required"] is True


# ------------------------------------------------------------------ login, cookie, CSRF

def test_login_sets_a_strict_cookie_and_status_users_me_work(server, secrets):
    web = onboard(server, secrets)
    ans = Web(server.api).login("admin", ADMIN_PW)
    cookie_line = ans.headers["set-cookie"]
    for part in ("portunus_session=", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert part in cookie_line
    assert "Secure" not in cookie_line  # the public origin is http here
    assert ans.body["password_change_required"] is False and ans.body["user"]["user_id"] == "admin"
    status = web.get("/v1/auth/status").body
    assert status["authenticated"] is True and status["user"]["user_id"] == "admin"
    me = web.get("/v1/users/me")
    assert me.status == 200 and set(me.body) == USER_KEYS
    # wrong password and unknown user: one uniform error
    for user_id, password in (("admin", "not the password 00"), ("nobody", ADMIN_PW)):
        ans = Web(server.api).login(user_id, password)
        assert (ans.status, ans.code) == (401, "invalid_login")
        assert password not in json.dumps(ans.body) and "set-cookie" not in ans.headers


def test_cookie_writes_need_the_csrf_rules(server, secrets):
    web = onboard(server, secrets)
    body = {"user_id": "carol", "display_name": "Carol", "role": "user", "password": "carol password 01"}
    secrets.add(body["password"])
    assert web.request("POST", "/v1/users", body, csrf=False).code == "csrf_origin_required"
    assert web.request("POST", "/v1/users", body, origin="http://evil.example").code == "csrf_origin_mismatch"
    no_header = web.request("POST", "/v1/users", body, csrf=False, headers={"Origin": web.origin})
    assert (no_header.status, no_header.code) == (403, "csrf_header_required")
    text = web.request("POST", "/v1/users", raw=json.dumps(body).encode(), headers={"Content-Type": "text/plain"})
    assert text.code == "csrf_content_type_required"
    assert web.request("POST", "/v1/users", body).status == 201


def test_a_logged_out_cookie_is_dead(server, secrets):
    web = onboard(server, secrets)
    cookie = web.cookie
    out = web.request("POST", "/v1/auth/logout")
    assert out.status == 204 and "Max-Age=0" in out.headers["set-cookie"]
    reused = Web(server.api, cookie=cookie)
    assert reused.get("/v1/users/me").code == "unauthenticated"
    assert reused.get("/v1/auth/status").body["authenticated"] is False


def test_bad_bodies_and_ids(server, secrets):
    web = onboard(server, secrets)
    assert web.request("POST", "/v1/users", raw=b"{not json", headers={"Content-Type": "application/json"}).code \
        == "bad_request"
    # announced over 1 MiB: refused before a byte of it is read
    big = web.request("POST", "/v1/users", raw=b"{}", headers={"Content-Type": "application/json",
                                                               "Content-Length": str((1 << 20) + 1)})
    assert (big.status, big.code) == (413, "payload_too_large")
    base = {"display_name": "X", "role": "user", "password": "long enough password"}
    secrets.add(base["password"])
    for user_id, code in (("Alice", "validation.invalid_user_id"), ("9lives", "validation.invalid_user_id"),
                          ("a" * 33, "validation.invalid_user_id"), ("_sneaky", "validation.reserved_user_id"),
                          (7, "validation.invalid_user_id")):
        ans = web.request("POST", "/v1/users", {**base, "user_id": user_id})
        assert (ans.status, ans.code) == (400, code), (user_id, ans.body)
    short = web.request("POST", "/v1/users", {**base, "user_id": "shorty", "password": "x" * 11})
    assert (short.status, short.code) == (422, "password_too_short")
    long = web.request("POST", "/v1/users", {**base, "user_id": "longy", "password": "x" * 1025})
    assert (long.status, long.code) == (422, "password_too_long")
    assert "x" * 11 not in json.dumps(short.body) and "x" * 100 not in json.dumps(long.body)
    assert web.request("POST", "/v1/users", {**base, "user_id": "ok", "extra": 1}).code == "validation.unknown_field"
    assert web.get("/v1/users/nobody").status == 404
    assert web.get("/v1/grants/whatever").status == 405
    ans = web.request("POST", "/v1/grants", {"user_id": "admin", "client": "*", "listen_port_start": 200,
                                             "listen_port_end": 100, "protocols": ["tcp"]})
    assert (ans.status, ans.code) == (400, "validation.grant_port_range_invalid")
    ans = web.request("POST", "/v1/grants", {"user_id": "admin", "client": "*", "listen_port_start": 100,
                                             "listen_port_end": 200, "protocols": ["sctp"]})
    assert (ans.status, ans.code) == (400, "validation.invalid_protocol")
    assert web.request("DELETE", "/v1/grants/01ARZ3NDEKTSV4RRFFQ69G5FAV").status == 404


def test_users_and_grants_routes(server, secrets):
    web = onboard(server, secrets)
    secrets.add(ALICE_PW)
    ans = web.request("POST", "/v1/users", {"user_id": "alice", "display_name": "Alice", "role": "user",
                                            "password": ALICE_PW})
    assert ans.status == 201 and set(ans.body) == USER_KEYS
    assert web.request("POST", "/v1/users", {"user_id": "alice", "display_name": "A", "role": "user",
                                             "password": ALICE_PW}).code == "conflict.user_exists"
    assert {u["user_id"] for u in web.get("/v1/users").body["users"]} == {"admin", "alice"}
    assert web.get("/v1/users/alice").body["role"] == "user"
    grant = web.request("POST", "/v1/grants", {"user_id": "alice", "client": "*", "listen_port_start": 30000,
                                               "listen_port_end": 30010, "protocols": ["udp", "tcp"], "note": "lab"})
    assert grant.status == 201 and grant.body["protocols"] == ["tcp", "udp"] and grant.body["client"] == "*"
    assert set(grant.body) == {"grant_id", "user_id", "client", "listen_port_start", "listen_port_end", "protocols",
                               "note", "created_at"}
    assert [g["grant_id"] for g in web.get("/v1/grants?user_id=alice").body["grants"]] == [grant.body["grant_id"]]
    assert web.get("/v1/grants?user_id=admin").body["grants"] == []
    revoked = web.request("DELETE", f"/v1/grants/{grant.body['grant_id']}")
    assert revoked.status == 200 and revoked.body == {"removed_rule_ids": []}
    # an API reset: a temporary password, the user's sessions revoked
    alice = Web(server.api)
    assert alice.login("alice", ALICE_PW).status == 200
    secrets.add(alice.cookie)
    reset = web.request("POST", "/v1/users/alice/password")
    assert reset.status == 200 and set(reset.body) == {"user_id", "sessions_revoked", "temporary_password"}
    assert reset.body["sessions_revoked"] == 1
    secrets.add(reset.body["temporary_password"])
    assert alice.get("/v1/users/me").code == "unauthenticated"
    chosen = web.request("POST", "/v1/users/alice/password", {"new_password": "chosen password 001"})
    assert chosen.status == 200 and "temporary_password" not in chosen.body
    secrets.add("chosen password 001")
    removed = web.request("DELETE", "/v1/users/alice")
    assert removed.status == 200 and removed.body == {"removed_rule_ids": []}
    assert web.get("/v1/users/alice").status == 404
    # the last superadmin stays
    assert web.request("DELETE", "/v1/users/admin").code == "conflict.last_superadmin"


def test_patch_user_disables_enables_and_keeps_the_last_superadmin(server, secrets):
    web = onboard(server, secrets)
    secrets.add(ALICE_PW)
    assert web.request("POST", "/v1/users", {"user_id": "alice", "display_name": "Alice", "role": "user",
                                             "password": ALICE_PW}).status == 201
    alice = Web(server.api)
    assert alice.login("alice", ALICE_PW).status == 200
    secrets.add(alice.cookie)
    # disabling cuts her session at once and login stays the uniform invalid_login
    ans = web.request("PATCH", "/v1/users/alice", {"disabled": True})
    assert ans.status == 200 and ans.body["disabled"] is True and set(ans.body) == USER_KEYS
    assert alice.get("/v1/users/me").code == "unauthenticated"
    assert Web(server.api).login("alice", ALICE_PW).status == 401
    ans = web.request("PATCH", "/v1/users/alice", {"disabled": False, "display_name": "Alice B"})
    assert ans.status == 200 and ans.body["disabled"] is False and ans.body["display_name"] == "Alice B"
    alice = Web(server.api)
    assert alice.login("alice", ALICE_PW).status == 200
    secrets.add(alice.cookie)
    # bad bodies name the field; the last active superadmin can be neither disabled nor demoted
    assert web.request("PATCH", "/v1/users/alice", {}).status == 400
    assert web.request("PATCH", "/v1/users/alice", {"disabled": "yes"}).status == 400
    assert web.request("PATCH", "/v1/users/alice", {"role": "root"}).status == 400
    assert web.request("PATCH", "/v1/users/alice", {"password": "x"}).status == 400
    assert web.request("PATCH", "/v1/users/admin", {"disabled": True}).code == "conflict.last_superadmin"
    assert web.request("PATCH", "/v1/users/admin", {"role": "user"}).code == "conflict.last_superadmin"
    assert web.request("PATCH", "/v1/users/nobody", {"disabled": True}).status == 404
    # a tenant may not
    assert alice.request("PATCH", "/v1/users/alice", {"disabled": True}).code == "role_required"


# ------------------------------------------------------------------ throttle and recovery

def test_seven_wrong_passwords_lock_even_the_right_one_across_a_restart(server, secrets):
    onboard(server, secrets)
    for attempt in range(7):
        ans = Web(server.api).login("admin", f"wrong password {attempt:03d}")
        if attempt < 5:
            assert ans.code == "invalid_login", (attempt, ans.body)
        else:
            assert ans.code == "rate_limited", (attempt, ans.body)
    right = Web(server.api).login("admin", ADMIN_PW)
    assert (right.status, right.code) == (429, "rate_limited")
    assert int(right.headers["retry-after"]) > 0
    again = restart(secrets.track, server)
    still = Web(again.api).login("admin", ADMIN_PW)
    assert (still.status, still.code) == (429, "rate_limited") and int(still.headers["retry-after"]) > 0


def test_offline_temporary_reset_then_only_the_password_change_works(server, secrets):
    web = onboard(server, secrets)
    secrets.add(ALICE_PW)
    assert web.request("POST", "/v1/users", {"user_id": "alice", "display_name": "Alice", "role": "user",
                                             "password": ALICE_PW}).status == 201
    server.proc.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    res = offline(server.data_dir, "reset-password", "alice", "--temporary")
    assert res.returncode == 0, res.stderr
    temporary = res.stdout.strip().split("temporary_password=", 1)[1].split()[0]
    secrets.add(temporary)
    again = Server(secrets.track, server.data_dir)
    alice = Web(again.api)
    ans = alice.login("alice", temporary)
    assert ans.status == 200 and ans.body["password_change_required"] is True
    secrets.add(alice.cookie)
    assert alice.get("/v1/users/me").status == 200
    for method, path in (("GET", "/v1/rules"), ("GET", "/v1/clients"), ("POST", "/v1/rules")):
        got = alice.request(method, path, {} if method == "POST" else None)
        assert (got.status, got.code) == (403, "password_change_required"), (method, path)
    new_pw = "alice fresh password 1"
    secrets.add(new_pw)
    changed = alice.request("POST", "/v1/users/me/password", {"current_password": temporary,
                                                              "new_password": new_pw})
    assert changed.status == 204, changed.body
    assert alice.get("/v1/rules").status == 200
    assert alice.get("/v1/users/me").body["password_change_required"] is False
    assert Web(again.api).login("alice", temporary).code == "invalid_login"


def test_a_bearer_still_works_next_to_sessions(tmp_path, secrets):
    from cp import OPERATOR_TOKEN
    data = tmp_path / "legacy"
    write_server_toml(data)
    server = Server(secrets.track, data)
    assert not [l for l in server.proc.lines if l.startswith("Portunus onboarding setup token")]
    assert bearer(server.api, OPERATOR_TOKEN, "GET", "/v1/users/me").body["user_id"] == "_legacy"
    assert bearer(server.api, OPERATOR_TOKEN, "GET", "/v1/users").status == 200
    status = bearer(server.api, OPERATOR_TOKEN, "GET", "/v1/auth/status").body
    assert status["bootstrap_required"] is False and status["user"]["user_id"] == "_legacy"
    # bearer writes need no CSRF header
    ans = bearer(server.api, OPERATOR_TOKEN, "POST", "/v1/grants", {"user_id": "_legacy", "client": "*",
                                                                      "listen_port_start": 1, "listen_port_end": 2,
                                                                      "protocols": ["tcp"]})
    assert ans.status == 201
    secrets.add(OPERATOR_TOKEN)
