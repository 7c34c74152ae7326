"""Operator access: what the operator HTTP layer needs below it, behind one object.

``http/`` never imports ``store``: it authenticates bearers and sessions, runs the
identity operations (login, users, grants), scopes what a tenant sees, writes and reads
the audit trail and resolves client references through ``OperatorAccess``. Methods run
on HTTP threads; inside ``request_scope`` their store access borrows from a small
connection pool, so the fd count does not follow the number of HTTP threads.

Identity changes that take rules with them (removing a user, revoking a grant) commit
first, then remove the dependent rules from their clients through ``ServerCore``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import PortunusError
from ..log import log
from ..store import audit as store_audit
from ..store import clients as store_clients
from ..store import operators as store_operators
from ..store import rules as store_rules
from .identity import ANY_CLIENT, IdentityService

SUPERADMIN = "superadmin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user id (the rule ``owner``), a role, how they proved it."""

    user_id: str
    role: str
    display_name: str = ""
    via: str = "bearer"                     # "bearer" or "session"
    password_change_required: bool = False  # sessions only: limited to the password change
    session_hash: str | None = None         # sessions only: which one (kept on a password change)

    @property
    def is_superadmin(self) -> bool:
        return self.role == SUPERADMIN


class OperatorAccess:
    def __init__(self, store, core=None, identity: IdentityService | None = None):
        self._store = store
        self._core = core
        self.identity = identity or IdentityService(store)
        self._drops_lock = threading.Lock()
        self._audit_drops = 0
        self._closed_for_good = False  # onboarding, once closed, never reopens (the last superadmin stays)

    # ---- identity -------------------------------------------------------------
    def onboarding_required(self) -> bool:
        """True while no enabled superadmin exists (every non-public route answers bootstrap_required)."""
        if self._closed_for_good:
            return False
        if store_operators.has_superadmin(self._store):
            self._closed_for_good = True
            return False
        return True

    def principal_for_bearer(self, token: str) -> Principal | None:
        row = store_operators.authenticate_operator(self._store, token)
        if row is None:
            return None
        return Principal(row["user_id"], row["role"], row.get("display_name") or "")

    def principal_for_session(self, token: str) -> Principal | None:
        session = self.identity.authenticate_session(token)
        if session is None:
            return None
        return Principal(session.user_id, session.role, session.display_name, via="session",
                         password_change_required=session.password_change_required,
                         session_hash=session.session_hash)

    # ---- what a principal sees (tenants: their own rules, granted clients) ------------
    @staticmethod
    def owner_scope(principal: Principal) -> str | None:
        """The only owner whose rules ``principal`` sees; None means every rule (superadmins)."""
        return None if principal is None or principal.is_superadmin else principal.user_id

    def rule_owner(self, rule_id: str) -> str | None:
        return store_rules.get_rule(self._store, rule_id)["owner"]

    def visible_client_ids(self, principal: Principal) -> set[str] | None:
        """The clients ``principal`` may see; None means every client."""
        if principal is None or principal.is_superadmin:
            return None
        return self.identity.granted_client_ids(principal.user_id)

    def visible_client(self, principal: Principal, ref: str) -> dict:
        """A client by reference, or ``not_found`` when the principal's grants do not cover it."""
        client = self.client_ref(ref)
        visible = self.visible_client_ids(principal)
        if visible is not None and client["client_id"] not in visible:
            raise PortunusError("not_found", f"client {ref!r} not found", client=ref)
        return client

    def push_authorizer(self, principal: Principal):
        """The grant check ``ServerCore.push_rule`` runs after validation (None: superadmins push anywhere)."""
        if principal is None or principal.is_superadmin:
            return None

        def authorize(rule, client_id: str) -> None:
            self.identity.check_push(principal.user_id, principal.role, client_id, rule.protocol,
                                     rule.listen_port, rule.listen_port_end)
        return authorize

    # ---- identity changes that take rules with them -------------------------------------
    def remove_user(self, user_id: str, request_id: str | None = None) -> list[str]:
        rule_ids = self.identity.remove_user(user_id)  # committed before any rule goes
        self._remove_rules(rule_ids, request_id, f"user {user_id} removed")
        return rule_ids

    def revoke_grant(self, grant_id: str, request_id: str | None = None) -> list[str]:
        rule_ids = self.identity.revoke_grant(grant_id)
        self._remove_rules(rule_ids, request_id, f"grant {grant_id} revoked")
        return rule_ids

    def _remove_rules(self, rule_ids: list[str], request_id: str | None, why: str) -> None:
        for rule_id in rule_ids:
            try:
                if self._core is not None:
                    self._core.remove_rule(rule_id, request_id=request_id)
                else:
                    store_rules.delete_rule(self._store, rule_id)
            except PortunusError as exc:
                if exc.code != "not_found":  # removed meanwhile: nothing left to do
                    log.warn("identity.dependent_rule_not_removed", rule=rule_id, reason=why, code=exc.code)

    def grant_client(self, ref) -> str:
        """A grant's ``client``: ``*`` or the id of the client a reference names."""
        if ref == ANY_CLIENT:
            return ANY_CLIENT
        if not isinstance(ref, str) or not ref:
            raise PortunusError("validation.missing_client", "client (a client id, a unique name, or *) is required")
        return self.client_ref(ref)["client_id"]

    # ---- audit (SPEC §5) -------------------------------------------------------
    def record(self, actor: str, method: str, path: str, outcome: str, reason: str | None) -> bool:
        """Write one audit row; False (and counted) when it could not be written."""
        try:
            store_audit.append(self._store, actor, method, path, outcome, reason)
            return True
        except Exception:
            with self._drops_lock:
                self._audit_drops += 1
            if self._core is not None:
                self._core.count_audit_drop()  # portunus_audit_buffer_drops_total on /metrics
            raise

    @property
    def audit_drops(self) -> int:
        with self._drops_lock:
            return self._audit_drops

    def audit_entries(self, *, limit: int, outcome: str | None) -> list[dict]:
        return store_audit.list_entries(self._store, limit=limit, outcome=outcome)

    def audit_page(self, *, since: str | None, until: str | None, cursor: int | None, limit: int,
                   outcome: str | None) -> dict:
        return store_audit.page(self._store, since=since, until=until, cursor=cursor, limit=limit, outcome=outcome)

    # ---- lookups ------------------------------------------------------------------
    def client_ref(self, ref: str) -> dict:
        """A client by exact id or unique name (the same lookup the domain services use)."""
        return store_clients.resolve_client_ref(self._store, ref)

    # ---- store connections of HTTP threads ----------------------------------------------
    def request_scope(self):
        """Context for handling one request: store access borrows a pooled connection, given back at exit."""
        return self._store.pooled_connections()

    def release_connection(self) -> None:
        """Give the borrowed (or per-thread) connection back now, e.g. before a long wait in a stream."""
        self._store.release_thread_connection()
