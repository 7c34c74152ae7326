"""Grants: which clients, listen ports and protocols a non-superadmin may push to (SPEC §5, §6).

A grant on every client has ``client_id`` NULL in the table and ``"*"`` in the view.
Validation and the push fit check live in ``server/identity.py``.
"""

from __future__ import annotations

from ..errors import PortunusError
from .db import Store

ANY_CLIENT = "*"

_SELECT = "SELECT * FROM grants"


def grant_view(row) -> dict:
    """The SPEC §6 grant shape."""
    return {
        "grant_id": row["grant_id"],
        "user_id": row["user_id"],
        "client": row["client_id"] if row["client_id"] is not None else ANY_CLIENT,
        "listen_port_start": row["listen_port_start"],
        "listen_port_end": row["listen_port_end"],
        "protocols": row["protocols"].split(","),
        "note": row["note"],
        "created_at": row["created_at"],
    }


def insert_grant(store: Store, grant_id: str, user_id: str, client_id: str | None, start: int, end: int,
                 protocols: list[str], note: str | None, now: str) -> dict:
    with store.write() as conn:
        if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
            raise PortunusError("not_found", f"user {user_id!r} not found", user_id=user_id)
        if client_id is not None and conn.execute("SELECT 1 FROM clients WHERE client_id = ?",
                                                  (client_id,)).fetchone() is None:
            raise PortunusError("not_found", f"client {client_id!r} not found", client_id=client_id)
        conn.execute("INSERT INTO grants (grant_id, user_id, client_id, listen_port_start, listen_port_end, "
                     "protocols, note, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (grant_id, user_id, client_id, start, end, ",".join(protocols), note, now))
        return grant_view(conn.execute(_SELECT + " WHERE grant_id = ?", (grant_id,)).fetchone())


def get_grant(store: Store, grant_id) -> dict:
    row = None
    if isinstance(grant_id, str):
        row = store.read().execute(_SELECT + " WHERE grant_id = ?", (grant_id.upper(),)).fetchone()
    if row is None:
        raise PortunusError("not_found", f"grant {grant_id!r} not found", grant_id=grant_id)
    return grant_view(row)


def list_grants(store: Store, user_id: str | None = None) -> list[dict]:
    sql, args = _SELECT, ()
    if user_id is not None:
        sql, args = sql + " WHERE user_id = ?", (user_id,)
    return [grant_view(r) for r in store.read().execute(sql + " ORDER BY created_at, grant_id", args).fetchall()]


def grants_covering_client(store: Store, user_id: str, client_id: str) -> list[dict]:
    """The user's grants naming this client or every client, oldest first."""
    rows = store.read().execute(_SELECT + " WHERE user_id = ? AND (client_id = ? OR client_id IS NULL) "
                                          "ORDER BY created_at, grant_id", (user_id, client_id)).fetchall()
    return [grant_view(r) for r in rows]


def delete_grant(store: Store, grant_id: str) -> dict:
    """Remove a grant; returns it as it was."""
    with store.write() as conn:
        row = None
        if isinstance(grant_id, str):
            row = conn.execute(_SELECT + " WHERE grant_id = ?", (grant_id.upper(),)).fetchone()
        if row is None:
            raise PortunusError("not_found", f"grant {grant_id!r} not found", grant_id=grant_id)
        conn.execute("DELETE FROM grants WHERE grant_id = ?", (row["grant_id"],))
        return grant_view(row)


def owned_rules(store: Store, user_id: str) -> list[dict]:
    """(rule_id, client_id, protocol, listen_port, listen_port_end) of a user's rules, oldest first."""
    rows = store.read().execute("SELECT rule_id, client_id, protocol, listen_port, listen_port_end FROM rules "
                                "WHERE owner = ? ORDER BY created_at, rule_id", (user_id,)).fetchall()
    return [dict(r) for r in rows]
