"""The durable audit trail: one row per /v1 request (SPEC §5). Never a token or password."""

from __future__ import annotations

from ..errors import PortunusError
from .db import Store, now_rfc3339

OUTCOMES = ("allow", "deny")


def append(store: Store, actor: str | None, method: str, path: str, outcome: str,
           reason: str | None = None) -> int:
    """Write one row; returns its id."""
    if outcome not in OUTCOMES:
        raise PortunusError("internal", f"audit outcome must be allow or deny, got {outcome!r}")
    with store.write() as conn:
        cur = conn.execute("INSERT INTO audit (timestamp, actor, method, path, outcome, reason) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (now_rfc3339(), actor, method, path, outcome, reason))
        return cur.lastrowid


def list_entries(store: Store, limit: int = 100, outcome: str | None = None) -> list[dict]:
    """Newest first."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise PortunusError("validation.out_of_range", f"limit must be a positive integer, got {limit!r}")
    if outcome is not None and outcome not in OUTCOMES:
        raise PortunusError("validation.invalid_outcome", f"outcome must be allow or deny, got {outcome!r}")
    sql = "SELECT * FROM audit" + (" WHERE outcome = ?" if outcome else "") + " ORDER BY id DESC LIMIT ?"
    args = (outcome, limit) if outcome else (limit,)
    return [dict(r) for r in store.read().execute(sql, args).fetchall()]
