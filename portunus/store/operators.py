"""Operator identities that authenticate with a bearer: ``_superadmin`` (bootstrap-superadmin)
and ``_legacy`` (server.toml ``operator_token``), SPEC §4.1 and §5.
"""

from __future__ import annotations

from ..errors import PortunusError
from .clients import clean_label
from .db import Store, now_rfc3339
from .ids import hash_token, new_token

SUPERADMIN_ID = "_superadmin"
LEGACY_ID = "_legacy"
LEGACY_DISPLAY_NAME = "operator_token (server.toml)"


def has_superadmin(store: Store) -> bool:
    """True when an enabled superadmin exists (otherwise the server is in onboarding)."""
    row = store.read().execute("SELECT 1 FROM users WHERE role = 'superadmin' AND disabled = 0 LIMIT 1").fetchone()
    return row is not None


def bootstrap_superadmin(store: Store, name: str) -> str:
    """Create ``_superadmin`` with a bearer token; returns the plaintext token. Once per store."""
    name = clean_label(name, "display name", 64, "validation.invalid_display_name")
    token = new_token()
    now = now_rfc3339()
    with store.write() as conn:
        if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (SUPERADMIN_ID,)).fetchone():
            raise PortunusError("conflict.already_bootstrapped",
                                f"bootstrap-superadmin already ran on this store (user {SUPERADMIN_ID} exists); "
                                f"its token was shown once and cannot be shown again")
        conn.execute("INSERT INTO users (user_id, role, display_name, created_at) VALUES (?, 'superadmin', ?, ?)",
                     (SUPERADMIN_ID, name, now))
        conn.execute("INSERT INTO operator_tokens (token_hash, user_id, name, created_at) VALUES (?, ?, ?, ?)",
                     (hash_token(token), SUPERADMIN_ID, "bootstrap", now))
    return token


def ensure_legacy_operator(store: Store, token: str | None) -> bool:
    """Make server.toml's ``operator_token`` the one live bearer of ``_legacy``; True when it is live.

    ``_legacy`` is created only on a store with no other enabled superadmin (SPEC §4.1).
    Once it exists, the config stays authoritative for its bearer: a changed token
    replaces the old one, and no token (the key removed) revokes it.
    """
    now = now_rfc3339()
    with store.write() as conn:
        exists = conn.execute("SELECT 1 FROM users WHERE user_id = ?", (LEGACY_ID,)).fetchone() is not None
        live = conn.execute("SELECT token_hash FROM operator_tokens WHERE user_id = ? AND revoked_at IS NULL",
                            (LEGACY_ID,)).fetchall()
        wanted = hash_token(token) if token else None
        if wanted is not None and [r[0] for r in live] == [wanted]:
            return True
        if exists:
            conn.execute("UPDATE operator_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
                         (now, LEGACY_ID))
        if wanted is None:
            return False
        if not exists:
            other = conn.execute("SELECT 1 FROM users WHERE role = 'superadmin' AND disabled = 0 "
                                 "AND user_id != ? LIMIT 1", (LEGACY_ID,)).fetchone()
            if other is not None:
                return False
            conn.execute("INSERT INTO users (user_id, role, display_name, created_at) VALUES (?, 'superadmin', ?, ?)",
                         (LEGACY_ID, LEGACY_DISPLAY_NAME, now))
        holder = conn.execute("SELECT user_id FROM operator_tokens WHERE token_hash = ?", (wanted,)).fetchone()
        if holder is not None:
            if holder[0] != LEGACY_ID:
                # the same secret already names another identity; never let one bearer mean two users
                raise PortunusError("config_invalid", "operator_token in server.toml equals another operator's "
                                                      "token; choose a fresh one (gen-token)")
            conn.execute("UPDATE operator_tokens SET revoked_at = NULL, created_at = ? WHERE token_hash = ?",
                         (now, wanted))
        else:
            conn.execute("INSERT INTO operator_tokens (token_hash, user_id, name, created_at) VALUES (?, ?, ?, ?)",
                         (wanted, LEGACY_ID, "server.toml operator_token", now))
        return True


def authenticate_operator(store: Store, token: str) -> dict | None:
    """{user_id, role, display_name} for a live bearer of an enabled user, else None."""
    if not isinstance(token, str) or not token:
        return None
    row = store.read().execute(
        "SELECT u.user_id, u.role, u.display_name FROM operator_tokens t JOIN users u ON u.user_id = t.user_id "
        "WHERE t.token_hash = ? AND t.revoked_at IS NULL AND u.disabled = 0", (hash_token(token),)).fetchone()
    if row is None:
        return None
    return {"user_id": row["user_id"], "role": row["role"], "display_name": row["display_name"]}
