"""The durable audit trail: one row per /v1 request (SPEC §5). Never a token or password."""

from __future__ import annotations

from ..errors import PortunusError
from .db import Store, now_rfc3339, rfc3339

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


def _timestamp(value, what: str) -> str:
    """An RFC 3339 UTC timestamp, normalised to the stored form (lexically ordered)."""
    from datetime import datetime
    if not isinstance(value, str):
        raise PortunusError("validation.invalid_timestamp", f"{what} must be an RFC 3339 time, got {value!r}")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PortunusError("validation.invalid_timestamp",
                            f"{what} must be an RFC 3339 time like 2026-01-31T00:00:00Z, got {value!r}") from None
    if dt.tzinfo is None:
        raise PortunusError("validation.invalid_timestamp", f"{what} needs a time zone (Z or +hh:mm), got {value!r}")
    return rfc3339(dt)


def page(store: Store, *, since: str | None = None, until: str | None = None, cursor: int | None = None,
         limit: int = 100, outcome: str | None = None) -> dict:
    """Newest first, ``since <= timestamp < until``; ``next_cursor`` fetches the next (older) page."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise PortunusError("validation.out_of_range", f"limit must be 1..1000, got {limit!r}")
    if outcome is not None and outcome not in OUTCOMES:
        raise PortunusError("validation.invalid_outcome", f"outcome must be allow or deny, got {outcome!r}")
    where, args = [], []
    if since is not None:
        where.append("timestamp >= ?")
        args.append(_timestamp(since, "since"))
    if until is not None:
        where.append("timestamp < ?")
        args.append(_timestamp(until, "until"))
    if cursor is not None:
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 1:
            raise PortunusError("validation.invalid_cursor", f"cursor must come from next_cursor, got {cursor!r}")
        where.append("id < ?")
        args.append(cursor)
    if outcome is not None:
        where.append("outcome = ?")
        args.append(outcome)
    sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
    rows = [dict(r) for r in store.read().execute(sql, (*args, limit + 1)).fetchall()]
    more = len(rows) > limit
    rows = rows[:limit]
    return {"entries": rows, "next_cursor": rows[-1]["id"] if more else None, "count": len(rows)}


def prune(store: Store, before: str, dry_run: bool = False) -> int:
    """Delete (or, dry run, count) rows older than ``before``."""
    cutoff = _timestamp(before, "--before")
    if dry_run:
        return store.read().execute("SELECT COUNT(*) FROM audit WHERE timestamp < ?", (cutoff,)).fetchone()[0]
    with store.write() as conn:
        return conn.execute("DELETE FROM audit WHERE timestamp < ?", (cutoff,)).rowcount
