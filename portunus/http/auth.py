"""The one authentication/authorization seam every /v1 request passes through.

It turns a request into a ``Principal`` (or a refusal), and writes exactly one
audit row and one ``operator.allow`` / ``operator.deny`` log line per request.
Never a token in either.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from ..errors import PortunusError
from ..log import log
from ..store import audit as store_audit
from ..store import operators as store_operators

# routes that need no principal
PUBLIC = {("GET", "/v1/auth/status"), ("GET", "/v1/openapi.json")}


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: str
    display_name: str = ""
    via: str = "bearer"

    @property
    def is_superadmin(self) -> bool:
        return self.role == "superadmin"


def bearer_token(headers) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class AuthSeam:
    def __init__(self, store, core=None):
        self.store = store
        self.core = core

    def authenticate(self, method: str, path: str, headers) -> Principal | None:
        """Principal for the request; None for public routes; raises for refusals."""
        if (method, path) in PUBLIC:
            return None
        token = bearer_token(headers)
        row = store_operators.authenticate_operator(self.store, token) if token is not None else None
        if row is None:
            if not store_operators.has_superadmin(self.store):
                raise PortunusError("bootstrap_required",
                                    "no superadmin exists yet: run `portunus-server bootstrap-superadmin --name NAME` "
                                    "(server stopped) or set operator_token in server.toml")
            if token is None:
                raise PortunusError("unauthenticated", "missing bearer token (Authorization: Bearer …)")
            raise PortunusError("unauthenticated", "invalid or revoked bearer token")
        return Principal(row["user_id"], row["role"], row.get("display_name") or "")

    @staticmethod
    def require_superadmin(p: Principal | None) -> None:
        if p is None or not p.is_superadmin:
            raise PortunusError("forbidden", "this route is for superadmins")

    def audit(self, principal: Principal | None, method: str, path: str, outcome: str, reason: str | None,
              status: int, request_id: str | None) -> None:
        actor = principal.user_id if principal else "anonymous"
        event = "operator.allow" if outcome == "allow" else "operator.deny"
        log.info(event, actor=actor, method=method, path=path, status=status, reason=reason, request_id=request_id)
        try:
            store_audit.append(self.store, actor, method, path, outcome, reason)
        except Exception as exc:  # audit must not take the request down; count the loss
            if self.core is not None:
                self.core.audit_drops = getattr(self.core, "audit_drops", 0) + 1
            log.error("audit.write_failed", error=f"{type(exc).__name__}: {exc}")
        if self.core is not None:
            self.core.count_request(outcome, reason or "ok")


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
