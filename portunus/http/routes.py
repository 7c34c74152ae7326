"""The operator API's routing table, read top to bottom, and the handlers it names.

A handler takes ``(api, principal, params, query, body, ctx)`` and returns
``(status, payload)``; payload is a JSON value, a ``(content_type, text)`` pair, or
a ``StatsStream``. Who may call a route is the table's ``access`` column, enforced by
``auth.AuthSeam``, never by the handler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .. import __version__
from ..errors import PortunusError
from .auth import AUTHENTICATED, LEVELS, OWNER, PUBLIC, SUPERADMIN
from .parse import query_flag, query_int, query_value
from .routes_caps import CAP_ROUTES
from .routes_quota import QUOTA_ROUTES

AUDIT_LIMIT_MAX = 1000


@dataclass(frozen=True)
class StatsStream:
    """Answer with Server-Sent Events: ``first`` now, then a snapshot per report tick."""

    rule_id: str
    first: dict


# ---------------------------------------------------------------- handlers

def auth_status(api, p, m, q, body, ctx):
    who = api.auth.identify(ctx["headers"])
    user = _user_or_none(api, who.user_id) if who is not None else None
    return 200, {"version": __version__, "bootstrap_required": api.access.onboarding_required(),
                 "authenticated": user is not None, "user": user,
                 "password_change_required": bool(user and who.password_change_required)}


def _user_or_none(api, user_id: str):
    try:
        return api.access.identity.get_user(user_id)
    except PortunusError:
        return None


def onboarding(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"setup_token", "user_id", "display_name", "password"})
    user = api.access.identity.complete_onboarding(body.get("setup_token"), body.get("user_id"),
                                                   body.get("display_name"), body.get("password"),
                                                   remote_ip=ctx["remote_ip"])
    return 201, {"user": user}


def login(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"user_id", "password"})
    result = api.access.identity.login(body.get("user_id"), body.get("password"), remote_ip=ctx["remote_ip"])
    return 200, {"user": result.user, "password_change_required": result.password_change_required}, \
        {"Set-Cookie": api.session_cookie(result.session_token)}


def logout(api, p, m, q, body, ctx):
    if ctx["cookie"] is not None:
        api.access.identity.logout(ctx["cookie"])
    return 204, None, {"Set-Cookie": api.session_cookie("")}


def users_me(api, p, m, q, body, ctx):
    return 200, api.access.identity.get_user(p.user_id)


def change_my_password(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"current_password", "new_password"})
    api.access.identity.change_password(p.user_id, body.get("current_password"), body.get("new_password"),
                                        remote_ip=ctx["remote_ip"], keep_session_hash=p.session_hash)
    return 204, None


def create_user(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"user_id", "display_name", "role", "password"})
    return 201, api.access.identity.create_user(body.get("user_id"), body.get("display_name"),
                                                body.get("role", "user"), body.get("password"))


def list_users(api, p, m, q, body, ctx):
    return 200, {"users": api.access.identity.list_users()}


def get_user(api, p, m, q, body, ctx):
    return 200, api.access.identity.get_user(m["id"])


def update_user(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"display_name", "role", "disabled"})
    if not body:
        raise PortunusError("validation.no_fields", "PATCH users/{id} needs display_name, role or disabled")
    return 200, api.access.identity.update_user(m["id"], display_name=body.get("display_name"),
                                                role=body.get("role"), disabled=body.get("disabled"))


def remove_user(api, p, m, q, body, ctx):
    return 200, {"removed_rule_ids": api.access.remove_user(m["id"], request_id=ctx["request_id"])}


def reset_user_password(api, p, m, q, body, ctx):
    body = _object(body if body is not None else {})
    _only(body, {"new_password"})
    new_password = body.get("new_password")
    if isinstance(new_password, str) and not new_password:
        new_password = None  # blank: a generated temporary password
    out = api.access.identity.reset_password(m["id"], new_password, revoke_api_tokens=False)
    shown = {"user_id": out["user_id"], "sessions_revoked": out["sessions_revoked"]}
    if "temporary_password" in out:
        shown["temporary_password"] = out["temporary_password"]
    return 200, shown


def create_grant(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"user_id", "client", "listen_port_start", "listen_port_end", "protocols", "note"})
    return 201, api.access.identity.add_grant(body.get("user_id"), api.access.grant_client(body.get("client")),
                                              body.get("listen_port_start"), body.get("listen_port_end"),
                                              body.get("protocols"), body.get("note"))


def list_grants(api, p, m, q, body, ctx):
    return 200, {"grants": api.access.identity.list_grants(query_value(q, "user_id"))}


def revoke_grant(api, p, m, q, body, ctx):
    return 200, {"removed_rule_ids": api.access.revoke_grant(m["id"], request_id=ctx["request_id"])}


def enroll_client(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"name", "client_name", "address", "ttl_secs"})
    name = body.get("name", body.get("client_name"))
    return 201, api.core.enroll_client(name, address=body.get("address"), ttl_secs=body.get("ttl_secs"),
                                       request_host=ctx["host"])


def reenroll_client(api, p, m, q, body, ctx):
    body = _object(body or {})
    _only(body, {"ttl_secs"})
    client = api.access.client_ref(m["id"])
    return 201, api.core.reenroll_client(client["client_id"], ttl_secs=body.get("ttl_secs"),
                                         request_host=ctx["host"])


def list_clients(api, p, m, q, body, ctx):
    return 200, {"clients": api.core.list_clients(only=api.access.visible_client_ids(p))}


def get_client(api, p, m, q, body, ctx):
    return 200, api.core.client_view(api.access.visible_client(p, m["id"]))


def put_client(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"address"})
    if "address" not in body:
        raise PortunusError("validation.missing_field", "address is required (null clears it)")
    return 200, api.core.set_address(api.access.client_ref(m["id"])["client_id"], body["address"])


def rename_client(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"name", "client_name"})
    client_id = api.access.client_ref(m["id"])["client_id"]
    return 200, api.core.rename_client(client_id, body.get("name", body.get("client_name")))


def revoke_client(api, p, m, q, body, ctx):
    return 200, api.core.revoke_client(api.access.client_ref(m["id"])["client_id"])


def delete_client(api, p, m, q, body, ctx):
    api.core.delete_client(api.access.client_ref(m["id"])["client_id"])
    return 200, {"deleted": True}


def push_rule(api, p, m, q, body, ctx):
    body = _object(body)
    ack = body.pop("ack_timeout_secs", None)
    ack = 2.0 if ack is None else ack
    if isinstance(ack, bool) or not isinstance(ack, (int, float)) or not 0 <= ack <= 60:
        raise PortunusError("validation.invalid_ack_timeout", f"ack_timeout_secs must be 0..60, got {ack!r}")
    return api.core.push_rule(body, owner=p.user_id, ack_timeout=float(ack), request_id=ctx["request_id"],
                              authorize=api.access.push_authorizer(p))


def list_rules(api, p, m, q, body, ctx):
    owner = query_value(q, "owner")
    scope = api.access.owner_scope(p)
    if scope is not None and owner not in (None, scope):
        return 200, {"rules": []}  # a tenant sees only their own rules, whatever the filter asks
    return 200, {"rules": api.core.list_rules(client=query_value(q, "client"), owner=scope or owner)}


def get_rule(api, p, m, q, body, ctx):
    return 200, api.core.get_rule(m["id"])


def delete_rule(api, p, m, q, body, ctx):
    return 200, api.core.remove_rule(m["id"], request_id=ctx["request_id"])


def rule_stats(api, p, m, q, body, ctx):
    return 200, api.core.rule_stats(m["id"], per_port=query_flag(q, "per_port"),
                                    per_target=query_flag(q, "per_target"))


def rule_stats_stream(api, p, m, q, body, ctx):
    # the first snapshot is taken here, so an unknown rule is an ordinary 404 before the stream starts
    return 200, StatsStream(m["id"], api.core.rule_stats(m["id"], per_port=True, per_target=True))


def metrics(api, p, m, q, body, ctx):
    return 200, ("text/plain; version=0.0.4; charset=utf-8", api.core.metrics_text())


def get_advertised_endpoint(api, p, m, q, body, ctx):
    info = api.core.advertised_endpoint_info(ctx["host"])
    info.pop("error", None)
    return 200, info


def put_advertised_endpoint(api, p, m, q, body, ctx):
    body = _object(body)
    _only(body, {"override"})
    if "override" not in body:
        raise PortunusError("validation.missing_field", "override is required (a host:port, or null to clear it)")
    return 200, api.core.set_advertised_override(body["override"])


def get_audit(api, p, m, q, body, ctx):
    outcome = query_value(q, "outcome")
    cursor = query_int(q, "cursor", code="validation.invalid_cursor")
    if any(query_value(q, k) is not None for k in ("since", "until", "cursor")):
        return 200, api.access.audit_page(since=query_value(q, "since"), until=query_value(q, "until"),
                                          cursor=cursor, limit=query_int(q, "limit", 100, high=AUDIT_LIMIT_MAX),
                                          outcome=outcome)
    limit = min(query_int(q, "limit", 100), AUDIT_LIMIT_MAX)  # the plain form clamps, as it always did
    return 200, {"entries": api.access.audit_entries(limit=limit, outcome=outcome)}


def openapi(api, p, m, q, body, ctx):
    from .openapi import document
    return 200, document(ROUTES)


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise PortunusError("bad_request", "the request body must be a JSON object")
    return body


def _only(body: dict, allowed: set) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise PortunusError("validation.unknown_field", f"unknown field(s): {', '.join(extra)}")


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Callable
    access: str
    summary: str
    password_change_ok: bool = False  # open to a session that must change its password first

    def __post_init__(self):
        if self.access not in LEVELS:
            raise ValueError(f"route {self.method} {self.pattern}: unknown access level {self.access!r}")


_ID = r"(?P<id>[^/]+)"
ROUTES = [
    Route("GET", r"/v1/auth/status", auth_status, PUBLIC,
          "{bootstrap_required, authenticated, user}: whether onboarding is still required, and who is calling."),
    Route("POST", r"/v1/auth/onboarding", onboarding, PUBLIC,
          "{setup_token, user_id, display_name, password} -> 201 {user}: create the first superadmin (once)."),
    Route("POST", r"/v1/auth/login", login, PUBLIC,
          "{user_id, password} -> {user, password_change_required} and the portunus_session cookie."),
    Route("POST", r"/v1/auth/logout", logout, PUBLIC, "End the cookie's session (204)."),
    Route("GET", r"/v1/users/me", users_me, AUTHENTICATED, "The calling user.", password_change_ok=True),
    Route("POST", r"/v1/users/me/password", change_my_password, AUTHENTICATED,
          "{current_password, new_password} -> 204; ends the user's other sessions.", password_change_ok=True),
    Route("POST", r"/v1/users", create_user, SUPERADMIN,
          "{user_id, display_name, role, password} -> 201 user (superadmin)."),
    Route("GET", r"/v1/users", list_users, SUPERADMIN, "{users} (superadmin)."),
    Route("GET", rf"/v1/users/{_ID}", get_user, SUPERADMIN, "One user (superadmin)."),
    Route("PATCH", rf"/v1/users/{_ID}", update_user, SUPERADMIN,
          "Change display_name, role or disabled (superadmin); the last active superadmin stays one."),
    Route("DELETE", rf"/v1/users/{_ID}", remove_user, SUPERADMIN,
          "Remove a user, then their rules from the clients -> {removed_rule_ids} (superadmin)."),
    Route("POST", rf"/v1/users/{_ID}/password", reset_user_password, SUPERADMIN,
          "{new_password?} -> {user_id, sessions_revoked, temporary_password?}; change required (superadmin)."),
    Route("POST", r"/v1/grants", create_grant, SUPERADMIN,
          "{user_id, client, listen_port_start, listen_port_end, protocols, note} -> 201 grant (superadmin)."),
    Route("GET", r"/v1/grants", list_grants, SUPERADMIN, "{grants} (?user_id=; superadmin)."),
    Route("DELETE", rf"/v1/grants/{_ID}", revoke_grant, SUPERADMIN,
          "Revoke a grant, then the rules no grant covers now -> {removed_rule_ids} (superadmin)."),
    Route("POST", r"/v1/client-enrollments", enroll_client, SUPERADMIN,
          "Create a client and a one-time enrollment command (superadmin)."),
    Route("GET", r"/v1/clients", list_clients, AUTHENTICATED, "List clients (a user: the clients a grant covers)."),
    Route("GET", rf"/v1/clients/{_ID}", get_client, AUTHENTICATED, "One client (a user: only a granted one)."),
    Route("PUT", rf"/v1/clients/{_ID}", put_client, SUPERADMIN, "Set the client's address (superadmin)."),
    Route("PATCH", rf"/v1/clients/{_ID}/name", rename_client, SUPERADMIN,
          "Rename a client (keeps id and session; superadmin)."),
    Route("POST", rf"/v1/clients/{_ID}/enrollment", reenroll_client, SUPERADMIN,
          "Re-enroll: new code, same id and rules (superadmin)."),
    Route("POST", rf"/v1/clients/{_ID}/revoke", revoke_client, SUPERADMIN,
          "Revoke the token and disconnect now (superadmin)."),
    Route("DELETE", rf"/v1/clients/{_ID}", delete_client, SUPERADMIN, "Delete a revoked client (superadmin)."),
    Route("POST", r"/v1/rules", push_rule, AUTHENTICATED,
          "Push a rule and wait for the client's ack (a user: inside one of their grants; owner is the caller)."),
    Route("GET", r"/v1/rules", list_rules, AUTHENTICATED, "List rules (?client=&owner=; a user: their own)."),
    Route("GET", rf"/v1/rules/{_ID}", get_rule, OWNER, "One rule (its owner or a superadmin)."),
    Route("DELETE", rf"/v1/rules/{_ID}", delete_rule, OWNER, "Drain and remove a rule (its owner or a superadmin)."),
    Route("GET", rf"/v1/rules/{_ID}/stats", rule_stats, OWNER,
          "Latest counters (?per_port=true&per_target=true; its owner or a superadmin)."),
    Route("GET", rf"/v1/rules/{_ID}/stats/stream", rule_stats_stream, OWNER,
          "Server-Sent Events: a snapshot per report tick (its owner or a superadmin)."),
    Route("GET", r"/v1/settings/advertised-endpoint", get_advertised_endpoint, SUPERADMIN,
          "The host:port enrollment commands point at, and where it comes from (superadmin)."),
    Route("PUT", r"/v1/settings/advertised-endpoint", put_advertised_endpoint, SUPERADMIN,
          "Set (or clear with null) the advertised endpoint override; must be covered by the cert SAN."),
    Route("GET", r"/v1/audit", get_audit, SUPERADMIN,
          "Audit rows, newest first (?limit=&outcome=, or ?since=&until=&cursor=&limit= "
          "for {entries, next_cursor, count}; superadmin)."),
    *(Route(*row) for row in QUOTA_ROUTES),  # quotas and traffic history (SPEC §4.4)
    *(Route(*row) for row in CAP_ROUTES),  # owner caps and PUT rules/{id} {rate_limit} (SPEC §2.9)
    Route("GET", r"/v1/metrics", metrics, SUPERADMIN, "Prometheus text (superadmin)."),
    Route("GET", r"/v1/openapi.json", openapi, PUBLIC, "This API, described."),
]
_COMPILED = [(route, re.compile(f"^{route.pattern}$")) for route in ROUTES]


def match(method: str, path: str) -> tuple[Route | None, dict, list[str]]:
    """(route, path params, methods allowed on this path); route is None for 404 (no methods) or 405."""
    allowed: list[str] = []
    for route, rx in _COMPILED:
        found = rx.match(path)
        if found:
            allowed.append(route.method)
            if route.method == method:
                return route, found.groupdict(), allowed
    return None, {}, allowed
