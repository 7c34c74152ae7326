"""Operator access: what the operator HTTP layer needs from the store, behind one object.

``http/`` never imports ``store``: it authenticates bearers, writes and reads the
audit trail and resolves client references through ``OperatorAccess``. Methods run
on HTTP threads; inside ``request_scope`` their store access borrows from a small
connection pool, so the fd count does not follow the number of HTTP threads.

The identity work (users, sessions, grants) adds its lookups here, next to
``principal_for_bearer``, and its access levels at the HTTP seam.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..store import audit as store_audit
from ..store import clients as store_clients
from ..store import operators as store_operators

SUPERADMIN = "superadmin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user id (the rule ``owner``), a role, how they proved it."""

    user_id: str
    role: str
    display_name: str = ""
    via: str = "bearer"

    @property
    def is_superadmin(self) -> bool:
        return self.role == SUPERADMIN


class OperatorAccess:
    def __init__(self, store, core=None):
        self._store = store
        self._core = core
        self._drops_lock = threading.Lock()
        self._audit_drops = 0

    # ---- identity -------------------------------------------------------------
    def onboarding_required(self) -> bool:
        """True while no enabled superadmin exists (every non-public route answers bootstrap_required)."""
        return not store_operators.has_superadmin(self._store)

    def principal_for_bearer(self, token: str) -> Principal | None:
        row = store_operators.authenticate_operator(self._store, token)
        if row is None:
            return None
        return Principal(row["user_id"], row["role"], row.get("display_name") or "")

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
                    # metrics_text still reads the drop count from the core; mirrored under our lock
                    self._core.audit_drops = self._audit_drops
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
