"""Web sessions (cookie ``portunus_session``), stored only as sha256 of the token (SPEC §5).

Expiry times are computed by ``server/identity.py`` (it owns the clock); this module
stores and compares the RFC3339 strings, which sort in time order.
"""

from __future__ import annotations

from .db import Store


def insert_session(store: Store, session_hash: str, user_id: str, now: str, expires_at: str) -> None:
    with store.write() as conn:
        conn.execute("INSERT INTO web_sessions (session_hash, user_id, created_at, last_seen_at, expires_at) "
                     "VALUES (?, ?, ?, ?, ?)", (session_hash, user_id, now, now, expires_at))


def find_session(store: Store, session_hash: str):
    """The session joined with its user (role, flags), or None."""
    return store.read().execute(
        "SELECT s.session_hash, s.user_id, s.created_at, s.last_seen_at, s.expires_at, u.role, u.display_name, "
        "u.disabled, u.password_change_required FROM web_sessions s JOIN users u ON u.user_id = s.user_id "
        "WHERE s.session_hash = ?", (session_hash,)).fetchone()


def touch_session(store: Store, session_hash: str, now: str) -> None:
    with store.write() as conn:
        conn.execute("UPDATE web_sessions SET last_seen_at = ? WHERE session_hash = ?", (now, session_hash))


def delete_session(store: Store, session_hash: str) -> bool:
    with store.write() as conn:
        return conn.execute("DELETE FROM web_sessions WHERE session_hash = ?", (session_hash,)).rowcount > 0


def delete_user_sessions(store: Store, user_id: str, keep_hash: str | None = None) -> int:
    """Revoke a user's sessions (all, or all but ``keep_hash``); returns how many."""
    with store.write() as conn:
        return conn.execute("DELETE FROM web_sessions WHERE user_id = ? AND session_hash IS NOT ?",
                            (user_id, keep_hash)).rowcount


def count_user_sessions(store: Store, user_id: str) -> int:
    return store.read().execute("SELECT COUNT(*) FROM web_sessions WHERE user_id = ?", (user_id,)).fetchone()[0]


def prune_expired(store: Store, now: str, idle_cutoff: str) -> int:
    """Delete sessions past their absolute expiry or idle since before ``idle_cutoff``."""
    with store.write() as conn:
        return conn.execute("DELETE FROM web_sessions WHERE expires_at <= ? OR last_seen_at <= ?",
                            (now, idle_cutoff)).rowcount
