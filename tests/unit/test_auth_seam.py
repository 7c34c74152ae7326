"""The auth seam with sessions (SPEC §5): CSRF for cookie writes, the cookie deciding over a bearer,
change-required sessions, the owner and superadmin levels, onboarding, and a real store behind it
for idle expiry and logout (injected clock, no sleeping)."""

from __future__ import annotations

import pytest

from portunus.errors import PortunusError
from portunus.http import routes
from portunus.http.auth import AUTHENTICATED, OWNER, PUBLIC, SELF, SUPERADMIN, AuthSeam, Request, session_cookie
from portunus.server.access import OperatorAccess, Principal
from portunus.server.identity import SESSION_IDLE_SECS, IdentityService
from portunus.store import Store
from portunus.store.db import ALLOW_ANY_FS_ENV

ORIGIN = "https://portunus.example.com"
ADMIN = Principal("_superadmin", "superadmin", "Ops")
ALICE = Principal("alice", "user", "Alice", via="session", session_hash="h-alice")
ALICE_CHANGE = Principal("alice", "user", "Alice", via="session", password_change_required=True)
BOB = Principal("bob", "user", "Bob", via="bearer")


class FakeAccess:
    def __init__(self, onboarding=False):
        self.onboarding = onboarding
        self.bearers = {"admin-token": ADMIN, "bob-token": BOB}
        self.sessions = {"alice-cookie": ALICE, "alice-change": ALICE_CHANGE}
        self.owners = {"R-ALICE": "alice", "R-BOB": "bob"}

    def onboarding_required(self):
        return self.onboarding

    def principal_for_bearer(self, token):
        return self.bearers.get(token)

    def principal_for_session(self, token):
        return self.sessions.get(token)

    def rule_owner(self, rule_id):
        if rule_id not in self.owners:
            raise PortunusError("not_found", f"rule {rule_id} not found")
        return self.owners[rule_id]


def seam(onboarding=False, origin=ORIGIN) -> AuthSeam:
    return AuthSeam(FakeAccess(onboarding), None, origin)


def req(method="GET", *, cookie=None, token=None, origin=None, csrf=None, ctype=None, body=False, host=None):
    headers = {}
    if cookie:
        headers["Cookie"] = f"theme=dark; portunus_session={cookie}"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if origin:
        headers["Origin"] = origin
    if csrf:
        headers["X-Portunus-CSRF"] = csrf
    if ctype:
        headers["Content-Type"] = ctype
    if host:
        headers["Host"] = host
    return Request(method, headers, "192.0.2.7", has_body=body)


def refused(code, fn, *args, **kw):
    with pytest.raises(PortunusError) as ei:
        fn(*args, **kw)
    assert ei.value.code == code, ei.value
    return ei.value


def good_write(**kw):
    return req("POST", cookie="alice-cookie", origin=ORIGIN, csrf="1", ctype="application/json", body=True, **kw)


# ------------------------------------------------------------------ CSRF (cookie writes only)

def test_cookie_writes_need_origin_header_and_json():
    s = seam()
    assert s.admit(AUTHENTICATED, good_write(), {}) == ALICE
    refused("csrf_origin_required", s.admit, AUTHENTICATED, req("POST", cookie="alice-cookie", csrf="1"), {})
    refused("csrf_origin_mismatch", s.admit, AUTHENTICATED,
            req("POST", cookie="alice-cookie", origin="https://evil.example", csrf="1"), {})
    refused("csrf_header_required", s.admit, AUTHENTICATED, req("DELETE", cookie="alice-cookie", origin=ORIGIN), {})
    refused("csrf_header_required", s.admit, AUTHENTICATED,
            req("PUT", cookie="alice-cookie", origin=ORIGIN, csrf="yes"), {})
    refused("csrf_content_type_required", s.admit, AUTHENTICATED,
            req("POST", cookie="alice-cookie", origin=ORIGIN, csrf="1", ctype="text/plain", body=True), {})
    refused("csrf_content_type_required", s.admit, AUTHENTICATED,
            req("PATCH", cookie="alice-cookie", origin=ORIGIN, csrf="1", body=True), {})
    # no body: no content type needed; a charset parameter is fine
    assert s.admit(AUTHENTICATED, req("DELETE", cookie="alice-cookie", origin=ORIGIN, csrf="1"), {}) == ALICE
    assert s.admit(AUTHENTICATED, req("POST", cookie="alice-cookie", origin=ORIGIN + "/", csrf="1",
                                      ctype="application/json; charset=utf-8", body=True), {}) == ALICE


def test_reads_and_bearer_writes_need_no_csrf():
    s = seam()
    assert s.admit(AUTHENTICATED, req("GET", cookie="alice-cookie"), {}) == ALICE
    assert s.admit(AUTHENTICATED, req("POST", token="bob-token", ctype="text/plain", body=True), {}) == BOB


def test_csrf_applies_to_public_writes_that_carry_the_cookie():
    refused("csrf_header_required", seam().admit, PUBLIC, req("POST", cookie="stale", origin=ORIGIN), {})
    assert seam().admit(PUBLIC, req("POST"), {}) is None


def test_without_a_configured_origin_the_host_the_browser_used_is_the_origin():
    s = seam(origin=None)
    ok = req("POST", cookie="alice-cookie", origin="http://127.0.0.1:7080", csrf="1", host="127.0.0.1:7080")
    assert s.admit(AUTHENTICATED, ok, {}) == ALICE
    refused("csrf_origin_mismatch", s.admit, AUTHENTICATED,
            req("POST", cookie="alice-cookie", origin="http://evil.example", csrf="1", host="127.0.0.1:7080"), {})


# ------------------------------------------------------------------ who is calling

def test_the_cookie_decides_over_a_bearer():
    s = seam()
    assert s.admit(AUTHENTICATED, req(cookie="alice-cookie", token="admin-token"), {}) == ALICE
    refused("role_required", s.admit, SUPERADMIN, req(cookie="alice-cookie", token="admin-token"), {})
    # a dead cookie is not rescued by a good bearer
    err = refused("unauthenticated", s.admit, AUTHENTICATED, req(cookie="logged-out", token="admin-token"), {})
    assert "logged-out" not in err.message
    # and CSRF applies to a cookie write even with a bearer
    refused("csrf_origin_required", s.admit, AUTHENTICATED, req("POST", cookie="alice-cookie", token="admin-token"),
            {})


def test_missing_and_bad_credentials_are_unauthenticated():
    refused("unauthenticated", seam().admit, AUTHENTICATED, req(), {})
    err = refused("unauthenticated", seam().admit, AUTHENTICATED, req(token="wrong-token"), {})
    assert "wrong-token" not in err.message


def test_onboarding_closes_every_protected_route_but_not_the_public_ones():
    s = seam(onboarding=True)
    for level in (AUTHENTICATED, OWNER, SUPERADMIN):
        refused("bootstrap_required", s.admit, level, req(token="admin-token"), {"id": "R-ALICE"})
    assert s.admit(PUBLIC, req(), {}) is None


def test_change_required_sessions_only_reach_the_marked_routes():
    s = seam()
    refused("password_change_required", s.admit, AUTHENTICATED, req(cookie="alice-change"), {})
    assert s.admit(AUTHENTICATED, req(cookie="alice-change"), {}, password_change_ok=True) == ALICE_CHANGE
    marked = {(r.method, r.pattern) for r in routes.ROUTES if r.password_change_ok}
    assert marked == {("GET", "/v1/users/me"), ("POST", "/v1/users/me/password")}


def test_the_principal_is_kept_for_the_audit_row_even_when_refused():
    request = req(token="bob-token")
    refused("role_required", seam().admit, SUPERADMIN, request, {})
    assert request.principal == BOB


# ------------------------------------------------------------------ levels

def test_owner_level():
    s = seam()
    assert s.admit(OWNER, req(cookie="alice-cookie"), {"id": "R-ALICE"}) == ALICE
    err = refused("not_owner", s.admit, OWNER, req(token="bob-token"), {"id": "R-ALICE"})
    assert err.fields["rule_id"] == "R-ALICE"
    refused("not_found", s.admit, OWNER, req(token="bob-token"), {"id": "R-NONE"})
    assert s.admit(OWNER, req(token="admin-token"), {"id": "R-ALICE"}) == ADMIN
    assert s.admit(OWNER, req(token="admin-token"), {"id": "R-NONE"}) == ADMIN  # the handler's 404


def test_self_level_is_the_path_user():
    assert seam().admit(SELF, req(token="bob-token"), {"u": "bob"}) == BOB
    refused("not_owner", seam().admit, SELF, req(token="bob-token"), {"u": "alice"})
    assert seam().admit(SELF, req(token="admin-token"), {"u": "alice"}) == ADMIN


def test_superadmin_level_is_role_required():
    refused("role_required", seam().admit, SUPERADMIN, req(token="bob-token"), {})
    assert seam().admit(SUPERADMIN, req(token="admin-token"), {}) == ADMIN


def test_every_admin_route_is_superadmin_and_rule_routes_by_id_are_owner():
    table = {(r.method, r.pattern): r.access for r in routes.ROUTES}
    for (method, pattern), level in table.items():
        own_data = pattern.startswith("/v1/users/me") or "/quotas" in pattern or "/traffic" in pattern
        if pattern.startswith(("/v1/users", "/v1/grants", "/v1/settings", "/v1/audit", "/v1/metrics",
                               "/v1/client-enrollments")) and not own_data:
            assert level == SUPERADMIN, (method, pattern)
        if pattern.startswith("/v1/clients/") and (method != "GET" or "/quotas" in pattern
                                                   or "/traffic" in pattern or "/owners" in pattern):
            assert level == SUPERADMIN, (method, pattern)
        if pattern.startswith("/v1/rules/"):
            assert level == OWNER, (method, pattern)
    public = {k for k, v in table.items() if v == PUBLIC}
    assert public == {("GET", "/v1/auth/status"), ("POST", "/v1/auth/onboarding"), ("POST", "/v1/auth/login"),
                      ("POST", "/v1/auth/logout"), ("GET", "/v1/openapi.json")}


@pytest.mark.parametrize("header,value", [
    ("portunus_session=abc", "abc"), ("a=1; portunus_session=abc; b=2", "abc"), ('portunus_session="abc"', "abc"),
    ("portunus_session=", None), ("other=abc", None), ("garbage;;=;", None), ("", None)])
def test_session_cookie_parsing(header, value):
    assert session_cookie({"Cookie": header}) == value


# ------------------------------------------------------------------ with a real store and clock

class Clock:
    def __init__(self, t=1_800_000_000):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def real(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ANY_FS_ENV, "1")
    store = Store.open(str(tmp_path / "data"))
    clock = Clock()
    identity = IdentityService(store, clock=clock)
    identity.create_user("admin", "Admin", "superadmin", "admin password 0001")
    identity.create_user("alice", "Alice", "user", "alice password 0001")
    s = AuthSeam(OperatorAccess(store, None, identity), None, ORIGIN)
    yield s, identity, clock
    store.close()


def test_a_session_past_8h_idle_is_unauthenticated(real):
    s, identity, clock = real
    cookie = identity.login("alice", "alice password 0001", remote_ip="192.0.2.7").session_token
    clock.t += SESSION_IDLE_SECS - 60
    assert s.admit(AUTHENTICATED, req(cookie=cookie), {}).user_id == "alice"  # this use counts as activity
    clock.t += SESSION_IDLE_SECS - 1
    assert s.admit(AUTHENTICATED, req(cookie=cookie), {}).user_id == "alice"
    clock.t += SESSION_IDLE_SECS
    refused("unauthenticated", s.admit, AUTHENTICATED, req(cookie=cookie), {})


def test_a_logged_out_cookie_never_works_again(real):
    s, identity, _ = real
    cookie = identity.login("alice", "alice password 0001", remote_ip="192.0.2.7").session_token
    assert s.admit(AUTHENTICATED, req(cookie=cookie), {}).via == "session"
    assert identity.logout(cookie)
    refused("unauthenticated", s.admit, AUTHENTICATED, req(cookie=cookie), {})


def test_a_reset_password_session_is_limited_until_the_change(real):
    s, identity, _ = real
    temporary = identity.reset_password("alice")["temporary_password"]
    cookie = identity.login("alice", temporary, remote_ip="192.0.2.7").session_token
    refused("password_change_required", s.admit, AUTHENTICATED, req(cookie=cookie), {})
    principal = s.admit(AUTHENTICATED, req(cookie=cookie), {}, password_change_ok=True)
    identity.change_password("alice", temporary, "alice new password 02", remote_ip="192.0.2.7",
                             keep_session_hash=principal.session_hash)
    assert s.admit(AUTHENTICATED, req(cookie=cookie), {}).password_change_required is False
