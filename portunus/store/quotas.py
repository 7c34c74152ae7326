"""Traffic quotas per (user, client): the monthly budget, its billing anchor and the current period's
usage (SPEC §4.4). Plain SQL; validation, period maths and pushes live in ``server/quotas.py``.

Every function takes the store first; called inside ``store.write()`` they join its transaction
(a nested write is a savepoint), so the service can read, decide and write atomically.
"""

from __future__ import annotations

from .db import Store

_SELECT = ("SELECT q.*, c.client_name FROM traffic_quotas q "
           "JOIN clients c ON c.client_id = q.client_id")
_ORDER = " ORDER BY q.user_id, c.client_name, q.client_id"


def quota_view(row) -> dict:
    """The SPEC §4.4 quota view (times in unix seconds)."""
    used, limit = row["period_bytes_used"], row["monthly_bytes"]
    return {
        "user_id": row["user_id"],
        "client_id": row["client_id"],
        "client_name": row["client_name"],
        "monthly_bytes": limit,
        "billing_anchor": row["billing_anchor"],
        "current_period_started_at": row["period_started_at"],
        "current_period_ends_at": row["period_ends_at"],
        "current_period_bytes_used": used,
        "budget_remaining_bytes": max(0, limit - used),
        "exhausted": row["exhausted_at"] is not None,
        "exhausted_at": row["exhausted_at"],
        "last_report_at": row["last_report_at"],
    }


def find_quota(store: Store, user_id: str, client_id: str):
    return store.read().execute(_SELECT + " WHERE q.user_id = ? AND q.client_id = ?",
                                (user_id, client_id)).fetchone()


def list_quotas(store: Store, *, user_id: str | None = None, client_id: str | None = None) -> list:
    where, args = [], []
    if user_id is not None:
        where.append("q.user_id = ?")
        args.append(user_id)
    if client_id is not None:
        where.append("q.client_id = ?")
        args.append(client_id)
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + _ORDER
    return store.read().execute(sql, args).fetchall()


def quotas_due(store: Store, now: int) -> list:
    """Quotas whose current period has ended at ``now``."""
    return store.read().execute(_SELECT + " WHERE q.period_ends_at <= ?" + _ORDER, (now,)).fetchall()


def insert_quota(store: Store, user_id: str, client_id: str, monthly_bytes: int, billing_anchor: int,
                 period: tuple[int, int], exhausted_at: int | None, now_text: str) -> None:
    with store.write() as conn:
        conn.execute("INSERT INTO traffic_quotas (user_id, client_id, monthly_bytes, billing_anchor, "
                     "period_started_at, period_ends_at, period_bytes_used, exhausted_at, created_at, updated_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                     (user_id, client_id, monthly_bytes, billing_anchor, period[0], period[1], exhausted_at,
                      now_text, now_text))


def update_quota(store: Store, user_id: str, client_id: str, *, monthly_bytes: int, period: tuple[int, int],
                 bytes_used: int, exhausted_at: int | None, now_text: str) -> None:
    """Write the whole mutable state at once: the service computes it from one read."""
    with store.write() as conn:
        conn.execute("UPDATE traffic_quotas SET monthly_bytes = ?, period_started_at = ?, period_ends_at = ?, "
                     "period_bytes_used = ?, exhausted_at = ?, updated_at = ? WHERE user_id = ? AND client_id = ?",
                     (monthly_bytes, period[0], period[1], bytes_used, exhausted_at, now_text, user_id, client_id))


def add_usage(store: Store, user_id: str, client_id: str, nbytes: int, report_at: int) -> bool:
    """Count delivered bytes into the current period; False when the pair has no quota."""
    with store.write() as conn:
        cur = conn.execute("UPDATE traffic_quotas SET period_bytes_used = period_bytes_used + ?, "
                           "last_report_at = ? WHERE user_id = ? AND client_id = ?",
                           (nbytes, report_at, user_id, client_id))
        return cur.rowcount > 0


def set_exhausted_at(store: Store, user_id: str, client_id: str, at: int) -> bool:
    """Mark the first exhaustion; False when already marked (or no quota)."""
    with store.write() as conn:
        cur = conn.execute("UPDATE traffic_quotas SET exhausted_at = ? WHERE user_id = ? AND client_id = ? "
                           "AND exhausted_at IS NULL", (at, user_id, client_id))
        return cur.rowcount > 0


def delete_quota(store: Store, user_id: str, client_id: str) -> bool:
    with store.write() as conn:
        return conn.execute("DELETE FROM traffic_quotas WHERE user_id = ? AND client_id = ?",
                            (user_id, client_id)).rowcount > 0


def rule_owners_on_client(store: Store, client_id: str) -> list[str]:
    """Users owning at least one rule on the client (the pairs a reconnect replay may need to clear)."""
    rows = store.read().execute("SELECT DISTINCT owner FROM rules WHERE client_id = ? AND owner IS NOT NULL "
                                "AND owner != '' ORDER BY owner", (client_id,)).fetchall()
    return [r[0] for r in rows]


def rule_owners(store: Store, client_id: str) -> dict[str, str]:
    """rule id -> owner ('' when none) of the client's rules."""
    rows = store.read().execute("SELECT rule_id, owner FROM rules WHERE client_id = ?", (client_id,)).fetchall()
    return {r[0]: r[1] or "" for r in rows}
