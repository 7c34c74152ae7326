"""Key/value settings stored in the database (e.g. the advertised endpoint override, SPEC §3.3)."""

from __future__ import annotations

from .db import Store


def get_setting(store: Store, key: str, default: str | None = None) -> str | None:
    row = store.read().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_setting(store: Store, key: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"setting {key!r} takes a string value, got {type(value).__name__}")
    with store.write() as conn:
        conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def delete_setting(store: Store, key: str) -> bool:
    """False when the key was not set."""
    with store.write() as conn:
        return conn.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount > 0
