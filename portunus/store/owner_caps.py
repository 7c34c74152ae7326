"""Owner envelope caps per (client, owner) (SPEC §2.9, §6). Plain SQL; validation, capability
gates and pushes live in ``server/owner_caps.py``.

Every function takes the store first; called inside ``store.write()`` they join its transaction
(a nested write is a savepoint), so the service can read, decide and write atomically.
"""

from __future__ import annotations

import json

from .db import Store


def owner_cap_view(row) -> dict:
    """``{client_id, owner_id, rate_limit, updated_at}`` of a stored cap."""
    return {
        "client_id": row["client_id"],
        "owner_id": row["owner_id"],
        "rate_limit": json.loads(row["rate_limit_json"]),
        "updated_at": row["updated_at"],
    }


def find_owner_cap(store: Store, client_id: str, owner_id: str):
    return store.read().execute("SELECT * FROM owner_rate_limits WHERE client_id = ? AND owner_id = ?",
                                (client_id, owner_id)).fetchone()


def list_owner_caps(store: Store, client_id: str) -> list:
    return store.read().execute("SELECT * FROM owner_rate_limits WHERE client_id = ? ORDER BY owner_id",
                                (client_id,)).fetchall()


def set_owner_cap(store: Store, client_id: str, owner_id: str, rate_limit: dict, now_text: str) -> None:
    """Insert or replace the cap (``rate_limit`` is ``RateLimit.to_dict()``)."""
    with store.write() as conn:
        conn.execute("INSERT INTO owner_rate_limits (client_id, owner_id, rate_limit_json, updated_at) "
                     "VALUES (?, ?, ?, ?) ON CONFLICT (client_id, owner_id) DO UPDATE SET "
                     "rate_limit_json = excluded.rate_limit_json, updated_at = excluded.updated_at",
                     (client_id, owner_id, json.dumps(rate_limit, sort_keys=True), now_text))


def delete_owner_cap(store: Store, client_id: str, owner_id: str) -> bool:
    with store.write() as conn:
        return conn.execute("DELETE FROM owner_rate_limits WHERE client_id = ? AND owner_id = ?",
                            (client_id, owner_id)).rowcount > 0


def rule_count(store: Store, client_id: str, owner_id: str) -> int:
    """How many rules ``owner_id`` has on the client."""
    return store.read().execute("SELECT COUNT(*) FROM rules WHERE client_id = ? AND owner = ?",
                                (client_id, owner_id)).fetchone()[0]


def list_owners(store: Store, client_id: str) -> list[dict]:
    """``[{owner_id, has_rate_limit, rule_count}]``: every owner with a rule or a cap on the client,
    by owner id. Rules without an owner are not an owner."""
    rows = store.read().execute(
        "SELECT o.owner_id, "
        "       EXISTS (SELECT 1 FROM owner_rate_limits c WHERE c.client_id = ? AND c.owner_id = o.owner_id), "
        "       (SELECT COUNT(*) FROM rules r WHERE r.client_id = ? AND r.owner = o.owner_id) "
        "FROM (SELECT owner AS owner_id FROM rules WHERE client_id = ? AND owner IS NOT NULL AND owner != '' "
        "      UNION SELECT owner_id FROM owner_rate_limits WHERE client_id = ?) o "
        "ORDER BY o.owner_id", (client_id, client_id, client_id, client_id)).fetchall()
    return [{"owner_id": r[0], "has_rate_limit": bool(r[1]), "rule_count": r[2]} for r in rows]
