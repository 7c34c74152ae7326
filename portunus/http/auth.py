"""The one authentication/authorization seam every /v1 request passes through.

Each route in the routing table declares an access level; ``AuthSeam.admit`` turns
the request into a ``Principal`` (or a refusal) and enforces that level. No handler
checks roles itself, and there is no other list of public routes.

Adding a level (e.g. ``owner``: superadmin, or the principal owns the resource the
path names) means one constant and one entry in ``LEVEL_CHECKS``: a check gets the
principal, the route's path parameters and the ``OperatorAccess``, so it can look the
resource up.

It also writes exactly one audit row and one ``operator.allow`` / ``operator.deny``
log line per request. Never a token in either.
"""

from __future__ import annotations

from ..errors import PortunusError
from ..log import log
from ..server.access import OperatorAccess, Principal

PUBLIC = "public"                # no principal needed
AUTHENTICATED = "authenticated"  # any live operator bearer
SUPERADMIN = "superadmin"        # role superadmin

MAX_AUDITED_PATH = 1024


def _any_principal(principal: Principal, params: dict, access: OperatorAccess) -> None:
    return None


def _superadmin_only(principal: Principal, params: dict, access: OperatorAccess) -> None:
    if not principal.is_superadmin:
        raise PortunusError("forbidden", "this route is for superadmins")


# level -> check run after authentication; raises when the principal may not call the route
LEVEL_CHECKS = {
    AUTHENTICATED: _any_principal,
    SUPERADMIN: _superadmin_only,
}
LEVELS = (PUBLIC, *LEVEL_CHECKS)


def bearer_token(headers) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class AuthSeam:
    def __init__(self, access: OperatorAccess, core=None):
        self.access = access
        self.core = core

    def admit(self, level: str, headers, params: dict) -> Principal | None:
        """The principal allowed to call a route of ``level``; None for public routes; raises refusals."""
        if level == PUBLIC:
            return None
        check = LEVEL_CHECKS[level]  # a KeyError here is a typo in the routing table
        principal = self.authenticate(headers)
        check(principal, params, self.access)
        return principal

    def authenticate(self, headers) -> Principal:
        token = bearer_token(headers)
        principal = self.access.principal_for_bearer(token) if token is not None else None
        if principal is None:
            if self.access.onboarding_required():
                raise PortunusError("bootstrap_required",
                                    "no superadmin exists yet: run `portunus-server bootstrap-superadmin --name NAME` "
                                    "(server stopped) or set operator_token in server.toml")
            if token is None:
                raise PortunusError("unauthenticated", "missing bearer token (Authorization: Bearer …)")
            raise PortunusError("unauthenticated", "invalid or revoked bearer token")
        return principal

    def audit(self, principal: Principal | None, method: str, path: str, outcome: str, reason: str | None,
              status: int, request_id: str | None) -> None:
        actor = principal.user_id if principal else "anonymous"
        if len(path) > MAX_AUDITED_PATH:  # anyone may send a 64 KiB path; the audit table keeps a prefix
            path = path[:MAX_AUDITED_PATH] + "…"
        event = "operator.allow" if outcome == "allow" else "operator.deny"
        log.info(event, actor=actor, method=method, path=path, status=status, reason=reason, request_id=request_id)
        try:
            self.access.record(actor, method, path, outcome, reason)
        except Exception as exc:  # audit must not take the request down; the access layer counts the loss
            log.error("audit.write_failed", error=f"{type(exc).__name__}: {exc}")
        if self.core is not None:
            self.core.count_request(outcome, reason or "ok")
