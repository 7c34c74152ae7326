"""The one auth seam: access levels from the routing table, enforced in one place (issue 9 point 5)."""

from __future__ import annotations

import ast
import inspect

import pytest

from portunus.errors import PortunusError
from portunus.http import auth, routes
from portunus.http.auth import AUTHENTICATED, LEVEL_CHECKS, OWNER, PUBLIC, SELF, SUPERADMIN, AuthSeam, bearer_token
from portunus.server.access import Principal


class FakeAccess:
    """Stands in for server.access.OperatorAccess: bearers from a dict, audit rows in a list."""

    def __init__(self, bearers=None, onboarding=False, audit_fails=False):
        self.bearers = bearers or {}
        self.onboarding = onboarding
        self.audit_fails = audit_fails
        self.rows = []

    def principal_for_bearer(self, token):
        return self.bearers.get(token)

    def onboarding_required(self):
        return self.onboarding

    def record(self, actor, method, path, outcome, reason):
        if self.audit_fails:
            raise OSError("disk full")
        self.rows.append((actor, method, path, outcome, reason))
        return True


class FakeCore:
    def __init__(self):
        self.counted = []

    def count_request(self, outcome, reason):
        self.counted.append((outcome, reason))


ADMIN = Principal("_superadmin", "superadmin", "Ops")
USER = Principal("u-alice", "user", "Alice")


def seam(**kw) -> AuthSeam:
    return AuthSeam(FakeAccess({"admin-token": ADMIN, "user-token": USER}, **kw), FakeCore())


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def refused(code, fn, *args):
    with pytest.raises(PortunusError) as ei:
        fn(*args)
    assert ei.value.code == code
    return ei.value


def test_public_routes_need_no_principal():
    assert seam().admit(PUBLIC, {}, {}) is None
    assert seam(onboarding=True).admit(PUBLIC, {}, {}) is None


@pytest.mark.parametrize("level", [AUTHENTICATED, SUPERADMIN])
def test_missing_or_bad_bearers_are_unauthenticated(level):
    assert "missing" in refused("unauthenticated", seam().admit, level, {}, {}).message
    assert "invalid" in refused("unauthenticated", seam().admit, level, bearer("nope"), {}).message
    refused("unauthenticated", seam().admit, level, {"Authorization": "Basic abc"}, {})


def test_onboarding_answers_bootstrap_required():
    refused("bootstrap_required", seam(onboarding=True).admit, AUTHENTICATED, {}, {})


def test_levels():
    assert seam().admit(AUTHENTICATED, bearer("user-token"), {}) == USER
    assert seam().admit(SUPERADMIN, bearer("admin-token"), {}) == ADMIN
    refused("role_required", seam().admit, SUPERADMIN, bearer("user-token"), {})


def test_an_unknown_level_is_a_table_bug_not_a_pass():
    with pytest.raises(KeyError):
        seam().admit("tenant", bearer("admin-token"), {})


def test_a_new_level_is_one_entry(monkeypatch):
    def owner_check(principal, params, access):
        if not principal.is_superadmin and params.get("id") != principal.user_id:
            raise PortunusError("not_owner", "not yours")
    monkeypatch.setitem(LEVEL_CHECKS, "custom", owner_check)
    assert seam().admit("custom", bearer("user-token"), {"id": "u-alice"}) == USER
    refused("not_owner", seam().admit, "custom", bearer("user-token"), {"id": "u-bob"})


@pytest.mark.parametrize("value,token", [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Bearer ", None),
                                         ("", None), ("Token abc", None)])
def test_bearer_token(value, token):
    assert bearer_token({"Authorization": value}) == token


def test_audit_writes_one_row_and_counts_the_request():
    s = seam()
    s.audit(ADMIN, "GET", "/v1/clients", "allow", None, 200, "r1")
    s.audit(None, "GET", "/v1/clients", "deny", "unauthenticated", 401, "r2")
    assert s.access.rows == [("_superadmin", "GET", "/v1/clients", "allow", None),
                             ("anonymous", "GET", "/v1/clients", "deny", "unauthenticated")]
    assert s.core.counted == [("allow", "ok"), ("deny", "unauthenticated")]


def test_a_failing_audit_write_does_not_fail_the_request():
    s = seam(audit_fails=True)
    s.audit(ADMIN, "GET", "/v1/clients", "allow", None, 200, "r1")
    assert s.core.counted == [("allow", "ok")]


# ------------------------------------------------------------------ the table is the only place

def test_every_route_declares_a_known_level():
    assert {r.access for r in routes.ROUTES} <= {PUBLIC, AUTHENTICATED, OWNER, SELF, SUPERADMIN}
    public = {(r.method, r.pattern) for r in routes.ROUTES if r.access == PUBLIC}
    assert public == {("GET", "/v1/auth/status"), ("POST", "/v1/auth/onboarding"), ("POST", "/v1/auth/login"),
                      ("POST", "/v1/auth/logout"), ("GET", "/v1/openapi.json")}
    admin = {(r.method, r.pattern) for r in routes.ROUTES if r.access == SUPERADMIN}
    assert {("GET", "/v1/settings/advertised-endpoint"), ("PUT", "/v1/settings/advertised-endpoint"),
            ("GET", "/v1/audit"), ("GET", "/v1/metrics"), ("POST", "/v1/users"), ("POST", "/v1/grants")} <= admin


def test_no_handler_checks_roles_itself():
    tree = ast.parse(inspect.getsource(routes))
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"require_superadmin", "is_superadmin", "role"}
    assert not hasattr(auth, "PUBLIC_ROUTES") and not hasattr(auth, "require_superadmin")


def test_a_typo_in_the_table_fails_at_import():
    with pytest.raises(ValueError):
        routes.Route("GET", "/v1/x", lambda *a: None, "superadmn", "typo")


def test_absurdly_long_paths_are_audited_as_a_prefix():
    s = seam()
    s.audit(None, "GET", "/v1/" + "a" * 70_000, "deny", "unauthenticated", 401, None)
    path = s.access.rows[0][2]
    assert path.startswith("/v1/aaa") and len(path) == auth.MAX_AUDITED_PATH + 1
