"""The one authentication/authorization seam every /v1 request passes through (SPEC §5).

Each route in the routing table declares an access level; ``AuthSeam.admit`` turns
the request into a ``Principal`` (or a refusal) and enforces that level. No handler
checks roles itself, and there is no other list of public routes. In order:

1. CSRF: a write (POST/PUT/PATCH/DELETE) that carries the ``portunus_session`` cookie
   needs ``Origin`` equal to the public origin, ``X-Portunus-CSRF: 1`` and a JSON
   content type when it has a body. Checked before anything else, on every route, so
   a forged cross-site form is refused the same way whatever it targets.
2. Public routes stop here (no principal).
3. While no active superadmin exists, every other route answers ``bootstrap_required``.
4. Authentication: the session cookie when the request has one (it decides even when a
   bearer header is present too), else the bearer.
5. A session whose password must change may only call routes marked
   ``password_change_ok`` (``GET users/me``, the password change, logout).
6. The level's check: ``authenticated`` (anyone), ``owner`` (superadmin, or the
   principal owns the rule the path names: ``not_owner``), ``self`` (superadmin, or the
   path's ``{u}`` is the principal: ``not_owner``), ``superadmin`` (``role_required``).

It also writes exactly one audit row and one ``operator.allow`` / ``operator.deny``
log line per request, with the actor. Never a token in either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PortunusError
from ..log import log
from ..server.access import OperatorAccess, Principal

PUBLIC = "public"                # no principal needed
AUTHENTICATED = "authenticated"  # any live bearer or session; the handler scopes what it shows
OWNER = "owner"                  # superadmin, or the owner of the rule named by the path's id
SELF = "self"                    # superadmin, or the user named by the path's {u} (their own quotas, traffic)
SUPERADMIN = "superadmin"        # role superadmin

SESSION_COOKIE = "portunus_session"
CSRF_HEADER = "X-Portunus-CSRF"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
JSON_TYPES = ("application/json",)
MAX_AUDITED_PATH = 1024


def _any_principal(principal: Principal, params: dict, access: OperatorAccess) -> None:
    return None


def _rule_owner(principal: Principal, params: dict, access: OperatorAccess) -> None:
    if principal.is_superadmin:
        return  # an unknown id is the handler's ordinary 404
    owner = access.rule_owner(params["id"])  # not_found for unknown ids, the same for everyone
    if owner != principal.user_id:
        raise PortunusError("not_owner", f"rule {params['id']} belongs to another user", rule_id=params["id"])


def _path_user(principal: Principal, params: dict, access: OperatorAccess) -> None:
    if not principal.is_superadmin and params.get("u") != principal.user_id:
        raise PortunusError("not_owner", f"user {principal.user_id!r} may reach only their own "
                                         f"/v1/users/{principal.user_id}/…, not {str(params.get('u'))[:64]!r}")


def _superadmin_only(principal: Principal, params: dict, access: OperatorAccess) -> None:
    if not principal.is_superadmin:
        raise PortunusError("role_required", f"this route is for superadmins; {principal.user_id!r} has role "
                                             f"{principal.role!r}")


# level -> check run after authentication; raises when the principal may not call the route
LEVEL_CHECKS = {
    AUTHENTICATED: _any_principal,
    OWNER: _rule_owner,
    SELF: _path_user,
    SUPERADMIN: _superadmin_only,
}
LEVELS = (PUBLIC, *LEVEL_CHECKS)


@dataclass
class Request:
    """What the seam reads of one HTTP request; ``principal`` is set once it is known (for the audit row)."""

    method: str
    headers: object  # a Mapping with .get (http.client.HTTPMessage or a dict)
    remote_ip: str = ""
    has_body: bool = False
    principal: Principal | None = field(default=None)


def bearer_token(headers) -> str | None:
    value = headers.get("Authorization", "") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def session_cookie(headers) -> str | None:
    """The ``portunus_session`` value of the Cookie header(s), or None (the first one wins)."""
    values = headers.get_all("Cookie") if hasattr(headers, "get_all") else [headers.get("Cookie")]
    for header in values or []:
        for part in (header or "").split(";"):
            name, eq, value = part.strip().partition("=")
            if eq and name == SESSION_COOKIE:
                return value.strip().strip('"') or None
    return None


def _has_cookie(headers) -> bool:
    return session_cookie(headers) is not None


class AuthSeam:
    def __init__(self, access: OperatorAccess, core=None, public_origin: str | None = None):
        self.access = access
        self.core = core
        self.public_origin = (public_origin or "").rstrip("/") or None

    def admit(self, level: str, request, params: dict, *, password_change_ok: bool = False) -> Principal | None:
        """The principal allowed to call a route of ``level``; None for public routes; raises refusals.

        ``request`` is a ``Request``; a plain header mapping is accepted for a GET without a body.
        """
        if not isinstance(request, Request):
            request = Request("GET", request)
        check = LEVEL_CHECKS.get(level) if level != PUBLIC else None
        if level != PUBLIC and check is None:
            raise KeyError(level)  # a typo in the routing table
        self.check_csrf(request)
        if level == PUBLIC:
            return None
        if self.access.onboarding_required():
            raise PortunusError("bootstrap_required",
                                "no superadmin exists yet: complete onboarding (the Web UI or POST "
                                "/v1/auth/onboarding with the setup token serve printed), or stop the server and run "
                                "`portunus-server bootstrap-superadmin --name NAME`, or set operator_token in "
                                "server.toml")
        principal = self.authenticate(request.headers)
        request.principal = principal
        if principal.password_change_required and not password_change_ok:
            raise PortunusError("password_change_required",
                                "this session may only read GET /v1/users/me and change the password "
                                "(POST /v1/users/me/password) until the password is changed")
        check(principal, params, self.access)
        return principal

    def check_csrf(self, request: Request) -> None:
        """SPEC §5: cookie-authenticated writes need Origin, X-Portunus-CSRF: 1 and a JSON body type."""
        if request.method not in WRITE_METHODS or not _has_cookie(request.headers):
            return
        origin = (request.headers.get("Origin") or "").strip()
        if not origin:
            raise PortunusError("csrf_origin_required", "a write with the session cookie needs an Origin header")
        allowed = self.allowed_origins(request.headers)
        if origin.rstrip("/") not in allowed:
            raise PortunusError("csrf_origin_mismatch", f"Origin {origin[:200]!r} is not this server's public origin "
                                                        f"({', '.join(map(repr, allowed))}; operator_http_public_origin)")
        if (request.headers.get(CSRF_HEADER) or "").strip() != "1":
            raise PortunusError("csrf_header_required", f"a write with the session cookie needs {CSRF_HEADER}: 1")
        if request.has_body:
            ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype not in JSON_TYPES:
                raise PortunusError("csrf_content_type_required",
                                    f"a body sent with the session cookie must be application/json, got "
                                    f"{ctype[:100]!r}" if ctype else
                                    "a body sent with the session cookie must have Content-Type: application/json")

    def allowed_origins(self, headers) -> list[str]:
        """The configured public origin; without one, the origin the browser reached us at (its Host)."""
        if self.public_origin is not None:
            return [self.public_origin]
        host = (headers.get("Host") or "").strip()
        return [f"http://{host}"] if host else []

    def authenticate(self, headers) -> Principal:
        """The cookie's session when there is a cookie (it decides), else the bearer; else unauthenticated."""
        cookie = session_cookie(headers)
        if cookie is not None:
            principal = self.access.principal_for_session(cookie)
            if principal is None:
                raise PortunusError("unauthenticated", "the session has ended (logged out, expired or revoked); "
                                                       "log in again")
            return principal
        token = bearer_token(headers)
        if token is None:
            raise PortunusError("unauthenticated", "missing credentials: log in (cookie portunus_session) or send "
                                                   "Authorization: Bearer …")
        principal = self.access.principal_for_bearer(token)
        if principal is None:
            raise PortunusError("unauthenticated", "invalid or revoked bearer token")
        return principal

    def identify(self, headers) -> Principal | None:
        """Who is calling, if anyone (``GET auth/status``); never raises for bad credentials."""
        try:
            return self.authenticate(headers)
        except PortunusError:
            return None

    def audit(self, principal: Principal | None, method: str, path: str, outcome: str, reason: str | None,
              status: int, request_id: str | None) -> None:
        actor = principal.user_id if principal else "anonymous"
        if len(path) > MAX_AUDITED_PATH:  # anyone may send a 64 KiB path; the audit table keeps a prefix
            path = path[:MAX_AUDITED_PATH] + "…"
        event = "operator.allow" if outcome == "allow" else "operator.deny"
        via = principal.via if principal else None
        log.info(event, actor=actor, via=via, method=method, path=path, status=status, reason=reason,
                 request_id=request_id)
        try:
            self.access.record(actor, method, path, outcome, reason)
        except Exception as exc:  # audit must not take the request down; the access layer counts the loss
            log.error("audit.write_failed", error=f"{type(exc).__name__}: {exc}")
        if self.core is not None:
            self.core.count_request(outcome, reason or "ok")
