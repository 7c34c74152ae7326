"""Users: people with passwords and the bearer identities (``_superadmin``, ``_legacy``), SPEC §5.

Plain SQL; validation of ids, roles and passwords lives in ``server/identity.py``. The
password hash column is never part of the user view (SPEC §6 user shape).
"""

from __future__ import annotations

from ..errors import PortunusError
from .db import Store

ROLES = ("superadmin", "user")

# an active superadmin: the same definition as operators.has_superadmin (onboarding closes on it)
_ACTIVE_SUPERADMINS = "SELECT user_id FROM users WHERE role = 'superadmin' AND disabled = 0"


def user_view(row) -> dict:
    """The SPEC §6 user shape."""
    return {
        "user_id": row["user_id"],
        "display_name": row["display_name"],
        "role": row["role"],
        "disabled": bool(row["disabled"]),
        "password_change_required": bool(row["password_change_required"]),
        "created_at": row["created_at"],
    }


def not_found(user_id) -> PortunusError:
    return PortunusError("not_found", f"user {user_id!r} not found", user_id=user_id)


def find_user_row(store: Store, user_id):
    """The full row (password hash included) or None; for login and the domain service only."""
    if not isinstance(user_id, str):
        return None
    return store.read().execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone()


def get_user(store: Store, user_id) -> dict:
    row = find_user_row(store, user_id)
    if row is None:
        raise not_found(user_id)
    return user_view(row)


def list_users(store: Store) -> list[dict]:
    rows = store.read().execute("SELECT * FROM users ORDER BY created_at, user_id").fetchall()
    return [user_view(r) for r in rows]


def insert_user(store: Store, user_id: str, display_name: str, role: str, password_hash: str | None,
                now: str, *, password_change_required: bool = False) -> dict:
    with store.write() as conn:
        if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone():
            raise PortunusError("conflict.user_exists", f"user {user_id!r} already exists", user_id=user_id)
        conn.execute("INSERT INTO users (user_id, role, display_name, disabled, password_hash, "
                     "password_change_required, created_at) VALUES (?, ?, ?, 0, ?, ?, ?)",
                     (user_id, role, display_name, password_hash, int(password_change_required), now))
        return user_view(conn.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone())


def active_superadmin_ids(store: Store) -> list[str]:
    return [r[0] for r in store.read().execute(_ACTIVE_SUPERADMINS + " ORDER BY user_id").fetchall()]


def _guard_last_superadmin(conn, user_id: str, what: str) -> None:
    """Refuse a change that would leave no active superadmin (checked inside the write transaction)."""
    others = conn.execute(_ACTIVE_SUPERADMINS + " AND user_id != ? LIMIT 1", (user_id,)).fetchone()
    if others is None:
        raise PortunusError("conflict.last_superadmin",
                            f"user {user_id!r} is the last active superadmin and cannot be {what}; "
                            f"create or enable another superadmin first", user_id=user_id)


def update_user(store: Store, user_id: str, *, display_name: str | None = None, role: str | None = None,
                disabled: bool | None = None) -> dict:
    """Change display name, role or disabled flag; the last active superadmin stays one."""
    with store.write() as conn:
        row = conn.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            raise not_found(user_id)
        is_active_superadmin = row["role"] == "superadmin" and not row["disabled"]
        if is_active_superadmin and role is not None and role != "superadmin":
            _guard_last_superadmin(conn, user_id, "demoted")
        if is_active_superadmin and disabled:
            _guard_last_superadmin(conn, user_id, "disabled")
        conn.execute("UPDATE users SET display_name = COALESCE(?, display_name), role = COALESCE(?, role), "
                     "disabled = COALESCE(?, disabled) WHERE user_id = ?",
                     (display_name, role, None if disabled is None else int(disabled), user_id))
        if disabled:
            # a disabled user is out now, not when the cookie expires
            conn.execute("DELETE FROM web_sessions WHERE user_id = ?", (user_id,))
        return user_view(conn.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone())


def delete_user(store: Store, user_id: str) -> list[str]:
    """Remove a user (grants, sessions, API tokens cascade); returns the ids of the rules it owned.

    The rules stay in the table until the caller has removed them from their clients
    (the identity change is committed first, SPEC §5).
    """
    with store.write() as conn:
        row = conn.execute("SELECT role, disabled FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            raise not_found(user_id)
        if row["role"] == "superadmin" and not row["disabled"]:
            _guard_last_superadmin(conn, user_id, "removed")
        rule_ids = [r[0] for r in conn.execute("SELECT rule_id FROM rules WHERE owner = ? ORDER BY created_at, "
                                               "rule_id", (user_id,))]
        conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
        return rule_ids


def set_password_hash(store: Store, user_id: str, password_hash: str, *, change_required: bool) -> None:
    with store.write() as conn:
        cur = conn.execute("UPDATE users SET password_hash = ?, password_change_required = ? WHERE user_id = ?",
                           (password_hash, int(change_required), user_id))
        if cur.rowcount == 0:
            raise not_found(user_id)


def replace_password_hash(store: Store, user_id: str, old_hash: str, new_hash: str) -> bool:
    """Swap in a re-hash with new parameters, unless the password changed meanwhile."""
    with store.write() as conn:
        cur = conn.execute("UPDATE users SET password_hash = ? WHERE user_id = ? AND password_hash = ?",
                           (new_hash, user_id, old_hash))
        return cur.rowcount > 0


def revoke_api_tokens(store: Store, user_id: str, now: str) -> int:
    """Revoke every live bearer (operator token) of a user; returns how many."""
    with store.write() as conn:
        return conn.execute("UPDATE operator_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                            (now, user_id)).rowcount
